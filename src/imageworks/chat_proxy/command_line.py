"""`imageworks-chat-proxy [--host HOST] [--port N] [--registry-dir DIR] [--log-level LEVEL]`.

Each flag stands for one environment variable, and `environment_from_argv` only turns the flags
into those variables; `main()` puts them in `os.environ` before the settings are read. So
config.py stays the one reader of the environment, a flag wins over the variable it stands for,
and a restart by exec (which runs the same command line, with the same environment) sees the
same values.

Bad usage (an unknown flag, a bad value) is one line on stderr and exit status 2, as for
`imageworks-loader`; `--help` and `--version` print and exit 0. None of them starts a server.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

from imageworks.chat_proxy.config import ENV_PREFIX, LOG_LEVELS, ProxySettings
from imageworks.config import RegistrySettings

PROG = "imageworks-chat-proxy"

EPILOG = (
    "Every setting is an environment variable; a flag wins over the one it sets. README.md "
    f"(section Configuration) lists every {ENV_PREFIX}* and IMAGEWORKS_* variable and its default."
)


class _Parser(argparse.ArgumentParser):
    """Bad usage is one line, naming the help to read (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def environment_from_argv(argv: Sequence[str], *, version: str) -> dict[str, str]:
    """The environment variables the command line sets, e.g. `{"CHAT_PROXY_PORT": "8200"}`
    for `--port 8200` (nothing for a flag not given). `--help` and `--version` print and raise
    `SystemExit(0)`; bad usage prints one line on stderr and raises `SystemExit(2)`."""
    args = _parser(version).parse_args(list(argv))
    given = {variable: getattr(args, dest) for dest, variable in _VARIABLES.items()}
    return {variable: value for variable, value in given.items() if value is not None}


# Each flag's destination and the variable it sets.
_VARIABLES = {
    "host": f"{ENV_PREFIX}HOST",
    "port": f"{ENV_PREFIX}PORT",
    "registry_dir": "IMAGEWORKS_REGISTRY_DIR",
    "log_level": f"{ENV_PREFIX}LOG_LEVEL",
}


def _parser(version: str) -> argparse.ArgumentParser:
    proxy = ProxySettings.model_fields
    registry = RegistrySettings.model_fields
    parser = _Parser(
        prog=PROG,
        description="Serve the OpenAI-compatible chat proxy for the models in the registry.",
        epilog=EPILOG,
        allow_abbrev=False,  # a flag is spelled out, so one added later breaks no command line
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    parser.add_argument(
        "--host",
        type=_not_empty,
        help=f"address to listen on (sets {_VARIABLES['host']}; default: {proxy['host'].default})",
    )
    parser.add_argument(
        "--port",
        type=_port,
        metavar="N",
        help=f"port to listen on (sets {_VARIABLES['port']}; default: {proxy['port'].default})",
    )
    parser.add_argument(
        "--registry-dir",
        type=_not_empty,
        metavar="DIR",
        help=f"the model registry's directory (sets {_VARIABLES['registry_dir']}; "
        f"default: {registry['registry_dir'].default})",
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help=f"level of the operator log on stderr and uvicorn's: {', '.join(LOG_LEVELS)} "
        f"(sets {_VARIABLES['log_level']}; default: {proxy['log_level'].default})",
    )
    return parser


def _port(text: str) -> str:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0 to 65535): {text!r}")
    return str(port)


def _not_empty(text: str) -> str:
    # An empty CHAT_PROXY_HOST would bind every interface, an empty registry directory is `.`.
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text
