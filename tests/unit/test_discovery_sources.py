"""What discovery reads from a weights directory: Hugging Face folders, GGUF files, the walk."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from imageworks.registry.gguf_info import read_gguf, split_part, split_parts
from imageworks.registry.hf_folder import read_hf_folder, safetensors_parameters
from imageworks.registry.weights_scan import scan_weights
from support.weights import SMOLLM2, hf_folder, write_gguf, write_safetensors


def test_safetensors_parameters_are_read_from_the_header_alone(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "m.safetensors", {"a": ("F16", [3, 4]), "b": ("F32", [5])})
    assert safetensors_parameters(path) == 17


def test_packed_quantized_weights_count_as_the_parameters_they_hold(tmp_path: Path) -> None:
    path = write_safetensors(
        tmp_path / "awq.safetensors",
        {
            "l.qweight": ("I32", [16, 2]),  # 16 x 16 four-bit weights, eight to an int32
            "l.qzeros": ("I32", [1, 2]),
            "l.scales": ("F16", [1, 16]),
        },
    )
    assert safetensors_parameters(path, bits=4) == 256


def test_a_truncated_safetensors_file_is_an_error_not_a_guess(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 500) + b"{")
    with pytest.raises(ValueError, match="not JSON"):
        safetensors_parameters(path)


def test_hf_vision_folder_with_quantization_and_template(tmp_path: Path) -> None:
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "vision_config": {"depth": 2},
        "quantization_config": {"quant_method": "AWQ", "bits": 4},
        "max_position_embeddings": 32768,
    }
    facts = read_hf_folder(hf_folder(tmp_path / "Qwen2-VL-2B-Instruct-AWQ", config))
    assert facts.quantization == "awq"
    assert facts.vision is True
    assert facts.embedding is False
    assert facts.chat_template
    assert facts.parameters == 64 * 16 + 16 * 16
    assert facts.context_length == 32768


def test_hf_text_folder_without_template_or_quantization(tmp_path: Path) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    facts = read_hf_folder(hf_folder(tmp_path / "tiny", config, template=False))
    assert (facts.quantization, facts.vision, facts.chat_template) == (None, False, None)


def test_an_image_processor_makes_a_folder_vision(tmp_path: Path) -> None:
    config = {"architectures": ["SomethingForCausalLM"], "model_type": "something"}
    facts = read_hf_folder(hf_folder(tmp_path / "x", config, processor=True))
    assert facts.vision is True


def test_split_file_names() -> None:
    first = Path("/w/big-00001-of-00003.gguf")
    assert split_part(first) == (1, 3)
    assert split_part(Path("/w/big.gguf")) is None
    assert [p.name for p in split_parts(first, 3)][-1] == "big-00003-of-00003.gguf"


def test_the_demo_gguf_header(demo_models: Path) -> None:
    facts = read_gguf(demo_models / SMOLLM2)
    assert facts.kind == "model"
    assert facts.architecture == "llama"
    assert facts.quantization == "q4_1"
    assert facts.size_label == "135M"
    assert facts.parameters > 100_000_000
    assert facts.context_length == 8192
    assert facts.chat_template is not None
    assert "im_start" in facts.chat_template
    assert facts.embedding is False


def test_the_header_walk_agrees_with_llama_cpps_own_reader(demo_models: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(demo_models / SMOLLM2)
    facts = read_gguf(demo_models / SMOLLM2)
    assert facts.parameters == sum(int(tensor.n_elements) for tensor in reader.tensors)
    assert facts.chat_template == reader.fields["tokenizer.chat_template"].contents()
    assert facts.name == reader.fields["general.name"].contents()
    assert facts.context_length == reader.fields["llama.context_length"].contents()


def test_a_truncated_gguf_is_a_value_error(tmp_path: Path, demo_models: Path) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes((demo_models / SMOLLM2).read_bytes()[:4096])
    with pytest.raises(ValueError, match="ends inside its header"):
        read_gguf(path)


def test_a_file_that_is_not_gguf_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf file at all, just bytes")
    with pytest.raises(ValueError, match="GGUF"):
        read_gguf(path)


def test_scan_finds_folders_and_ggufs_follows_links_once_and_skips_the_rest(
    tmp_path: Path, demo_models: Path
) -> None:
    root = tmp_path / "weights"
    hf_folder(root / "org" / "tiny-chat", {"architectures": ["LlamaForCausalLM"]})
    (root / "gguf").mkdir()
    (root / "gguf" / "smol.gguf").symlink_to(demo_models / SMOLLM2)
    (root / "gguf" / "smol-mmproj-f16.gguf").write_bytes(b"a projector: never read")
    (root / "again").symlink_to(root / "gguf")  # the same folder twice: walked once
    (root / "loop").symlink_to(root)  # a loop: walked once
    (root / ".cache").mkdir()
    (root / ".cache" / "hidden.gguf").write_bytes(b"GGUF")
    (root / "broken.gguf").write_bytes(b"GGUF broken")
    (root / "part-00001-of-00002.gguf").write_bytes(b"GGUF")  # its second part is missing

    scan = scan_weights(root)
    assert [Path(f.key).relative_to(root).as_posix() for f in scan.found] == [
        "again/smol.gguf",
        "org/tiny-chat",
    ]
    smol, folder = scan.found
    assert smol.fields["backend"] == "llamacpp"
    assert smol.fields["metadata"]["discovered"]["mmproj"].endswith("smol-mmproj-f16.gguf")
    assert folder.fields["backend"] == "vllm"
    assert folder.fields["download_format"] == "safetensors"
    assert any("broken.gguf" in w for w in scan.warnings)
    assert any("without part-00002-of-00002.gguf" in w for w in scan.warnings)
    assert not any("hidden" in w for w in scan.warnings)


def test_an_embedding_gguf_gets_the_embedding_role(tmp_path: Path) -> None:
    root = tmp_path / "weights"
    root.mkdir()
    write_gguf(
        root / "nomic-embed-text-v1.5.f32.gguf", "nomic-bert", **{"nomic-bert.pooling_type": 1}
    )
    [found] = scan_weights(root).found
    assert found.fields["roles"] == ["embedding"]
    assert found.fields["capabilities"] == {"embedding": True, "text": False}
    assert found.fields["quantization"] == "f32"
    assert found.notes == ()  # an embedding model needs no chat template


def test_a_split_gguf_is_one_model_counting_every_part(tmp_path: Path) -> None:
    root = tmp_path / "weights"
    root.mkdir()
    write_gguf(root / "big.gguf", "llama", split_max_tensors=1)
    assert sorted(p.name for p in root.iterdir()) == [
        "big-00001-of-00002.gguf",
        "big-00002-of-00002.gguf",
    ]
    [found] = scan_weights(root).found
    assert found.key.endswith("big-00001-of-00002.gguf")
    assert found.stem == "big"
    assert found.fields["metadata"]["discovered"]["parameters"] == 4 * 8 + 8


def test_projectors_and_adapters_are_not_models(tmp_path: Path) -> None:
    root = tmp_path / "weights"
    root.mkdir()
    write_gguf(root / "vision-encoder.gguf", "clip", **{"general.type": "mmproj"})
    write_gguf(root / "lora.gguf", "llama", **{"general.type": "adapter"})
    scan = scan_weights(root)
    assert scan.found == []
    assert scan.warnings == []


def test_a_sentence_transformers_folder_is_an_embedding_model(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "bge-small", {"architectures": ["BertModel"]}, template=False)
    (folder / "modules.json").write_text("[]")
    facts = read_hf_folder(folder)
    assert facts.embedding is True
