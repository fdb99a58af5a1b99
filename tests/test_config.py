"""Pipeline files: keys, types, overrides and the errors that name them."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.errors import ConfigError
from rlhf.pipeline.config import load_pipeline

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """
name: demo
model: tiny
sft:
  dataset: data/tiny/sft.jsonl
  learning_rate: 1.0e-3
"""


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_every_shipped_pipeline_file_parses_and_validates():
    files = sorted((REPO / "pipelines").glob("*.yaml"))
    assert len(files) >= 2, "the tiny pipeline and at least one GPU pipeline ship"
    for file in files:
        pipeline, _ = load_pipeline(file)
        assert pipeline.sft is not None, file


def test_tiny_pipeline_has_cpu_safe_defaults():
    pipeline, _ = load_pipeline(REPO / "pipelines" / "tiny.yaml")
    assert pipeline.model == "tiny"
    assert pipeline.sft.precision in ("auto", "fp32")  # never bf16 on a CPU


def test_shorthand_dataset_and_defaults(tmp_path):
    pipeline, _ = load_pipeline(_file(tmp_path, MINIMAL))
    assert pipeline.sft.dataset.path == "data/tiny/sft.jsonl"
    assert pipeline.sft.dataset.split == "train"
    assert pipeline.sft.learning_rate == pytest.approx(1e-3)
    assert pipeline.sft.mode == "full"


def test_overrides_are_coerced_to_the_field_type(tmp_path):
    pipeline, _ = load_pipeline(_file(tmp_path, MINIMAL), [
        "sft.learning_rate=1e-4",  # YAML 1.1 reads this as a string; the field makes it a float
        "sft.epochs=2", "sft.gradient_checkpointing=true", "sft.dataset.split=test",
        "sft.lora.target_modules=q_proj,v_proj", "seed=7",
    ])
    assert pipeline.sft.learning_rate == pytest.approx(1e-4)
    assert pipeline.sft.epochs == 2.0
    assert pipeline.sft.gradient_checkpointing is True
    assert pipeline.sft.dataset.path == "data/tiny/sft.jsonl" and pipeline.sft.dataset.split == "test"
    assert pipeline.sft.lora.target_modules == ["q_proj", "v_proj"]
    assert pipeline.seed == 7


def test_override_replaces_dataset_path(tmp_path):
    pipeline, _ = load_pipeline(_file(tmp_path, MINIMAL), ["sft.dataset=path/to/demos.jsonl"])
    assert pipeline.sft.dataset.path == "path/to/demos.jsonl"


@pytest.mark.parametrize("text, overrides, expected", [
    (MINIMAL + "  learnig_rate: 0.1\n", [], r"unknown key 'sft.learnig_rate'"),
    (MINIMAL + "colour: blue\n", [], r"unknown key 'colour'"),
    (MINIMAL, ["sft.nope=1"], r"unknown key 'sft.nope'"),
    (MINIMAL, ["nope.x=1"], r"override 'nope.x=1': unknown key 'nope'"),
    (MINIMAL, ["sft.epochs=many"], r"'sft.epochs' must be a number"),
    (MINIMAL, ["sft.mode=half"], r"'sft.mode' must be one of full, lora, top_n"),
    (MINIMAL, ["sft.batch_size=0"], r"'sft.batch_size' must be at least 1"),
    (MINIMAL, ["sft.lora.learning_rate=1e-3"], r"unknown key 'sft.lora.learning_rate'"),
    (MINIMAL + "ppo:\n  dataset: p.jsonl\n", ["ppo.lora.learning_rate=0"],
     r"'ppo.lora.learning_rate' must be > 0 when set"),
    (MINIMAL, ["tiny.initializer_range=0"], r"'tiny.initializer_range' must be positive"),
    (MINIMAL, ["tiny.embedding_init_range=-0.1"], r"'tiny.embedding_init_range' must be positive"),
    (MINIMAL, ["tiny.output_init_range=0"], r"'tiny.output_init_range' must be positive"),
    (MINIMAL, ["tiny.tie_word_embeddings=true", "tiny.output_init_range=0.3"],
     r"'tiny.output_init_range' sets an untied output head, but the head is tied .*tie_word_embeddings' to false"),
    (MINIMAL, ["name=../escape"], r"'name' must be letters"),
    (MINIMAL, ["justtext"], r"must look like key=value"),
    (MINIMAL + "kto:\n  dataset: x.jsonl\n", [], r"unknown stage 'kto'"),
    ("model: tiny\n", [], r"missing required key 'name'"),
    ("- a\n- b\n", [], r"must be a mapping"),
    ("name: [unclosed\n", [], r"not valid YAML"),
])
def test_bad_pipeline_files_name_the_file_and_key(tmp_path, text, overrides, expected):
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_pipeline(path, overrides)
    assert str(path) in str(err.value) or "override" in str(err.value)


def test_missing_pipeline_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_pipeline(tmp_path / "absent.yaml")
