"""Prometheus text read back with prometheus-client's own parser, as series to look up."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "imageworks_chat_proxy_"
Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_series(text: str) -> Series:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(series: Series, name: str, **labels: str) -> float | None:
    """The sample `PREFIX + name` with exactly these labels, if there is one."""
    return series.get((PREFIX + name, frozenset(labels.items())))


def label_sets(series: Series, name: str) -> list[dict[str, str]]:
    """The label sets of every sample named `PREFIX + name`."""
    return [dict(labels) for sample, labels in series if sample == PREFIX + name]
