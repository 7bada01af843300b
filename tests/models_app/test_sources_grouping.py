"""GGUF file names: quantization parsed, split sets joined with their total size, mmproj marked, globs resolved."""

import pytest

from models_app.sources import FileEntry, group_files, match_files, parse_quantization, split_info


@pytest.mark.parametrize(("name", "quant"), [
    ("Meta-Llama-3-8B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
    ("llama-2-7b.Q8_0.gguf", "Q8_0"),
    ("qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf", "Q4_K_M"),
    ("Qwen3-30B-A3B-UD-Q4_K_XL.gguf", "Q4_K_XL"),
    ("gemma-2-9b-it-IQ2_XS.gguf", "IQ2_XS"),
    ("Mistral-7B-IQ4_NL.gguf", "IQ4_NL"),
    ("phi-3-mini-4k-instruct-fp16.gguf", "F16"),
    ("Llama-3.2-1B-Instruct-BF16.gguf", "BF16"),
    ("model-F32.gguf", "F32"),
    ("ggml-model_q4_0.gguf", "Q4_0"),
    ("Model-Q4_0_4_4.gguf", "Q4_0_4_4"),
    ("BitNet-TQ1_0.gguf", "TQ1_0"),
    ("gpt-oss-20b-MXFP4.gguf", "MXFP4"),
    ("mmproj-model-f16.gguf", "F16"),
    ("Q4_K_M/DeepSeek-R1-00001-of-00009.gguf", "Q4_K_M"),  # unsloth: the folder names the quantization
    ("Qwen2-7B-Instruct.gguf", None),
    ("model.gguf", None),
])
def test_parse_quantization(name, quant):
    assert parse_quantization(name) == quant


def test_split_info():
    assert split_info("a/Model-Q8_0-00002-of-00003.gguf") == ("a/Model-Q8_0", 2, 3)
    assert split_info("Model-Q8_0.gguf") is None


FILES = [
    FileEntry("README.md", 10),
    FileEntry("config.json", 20),
    FileEntry("Model-Q4_K_M.gguf", 4000),
    FileEntry("Model-Q8_0.gguf", 8000),
    FileEntry("Model-F16-00001-of-00003.gguf", 6000),
    FileEntry("Model-F16-00002-of-00003.gguf", 6000),
    FileEntry("Model-F16-00003-of-00003.gguf", 4000),
    FileEntry("mmproj-model-f16.gguf", 600),
]


def test_group_files_by_quantization():
    groups = group_files(FILES)
    assert groups["other"] == [{"path": "README.md", "size": 10}, {"path": "config.json", "size": 20}]
    by_quant = {g["quantization"]: g for g in groups["gguf"] if not g["mmproj"]}
    assert set(by_quant) == {"Q4_K_M", "Q8_0", "F16"}
    split = by_quant["F16"]
    assert split["split"] and split["complete"] and split["parts"] == 3 and split["size"] == 16000
    assert split["files"] == [f"Model-F16-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert not by_quant["Q4_K_M"]["split"] and by_quant["Q4_K_M"]["files"] == ["Model-Q4_K_M.gguf"]
    assert [g["path"] for g in groups["gguf"]][-1] == "mmproj-model-f16.gguf"  # projectors after the models
    mmproj = groups["gguf"][-1]
    assert mmproj["mmproj"] and mmproj["quantization"] == "F16" and mmproj["size"] == 600


def test_incomplete_split_set_is_flagged():
    groups = group_files([FileEntry("M-Q2_K-00001-of-00002.gguf", 5)])
    assert groups["gguf"][0]["complete"] is False and groups["gguf"][0]["parts"] == 2


def test_match_files_brings_every_part_of_a_split_set():
    assert [f.path for f in match_files(FILES, "*F16-00001-of-00003.gguf")] == [
        "Model-F16-00001-of-00003.gguf", "Model-F16-00002-of-00003.gguf", "Model-F16-00003-of-00003.gguf"]
    assert [f.path for f in match_files(FILES, "*q4_k_m*")] == ["Model-Q4_K_M.gguf"]  # case-insensitive
    assert match_files(FILES, "*.safetensors") == []


def test_match_files_on_names_in_folders():
    files = [FileEntry("Q4_K_M/M-Q4_K_M.gguf", 1), FileEntry("Q8_0/M-Q8_0.gguf", 2)]
    assert [f.path for f in match_files(files, "M-Q8_0.gguf")] == ["Q8_0/M-Q8_0.gguf"]
    assert [f.path for f in match_files(files, "Q4_K_M/*")] == ["Q4_K_M/M-Q4_K_M.gguf"]
