"""Shared fixtures: every test gets its own registry root and wandb is off unless a test turns it on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "pipelines" / "tiny.yaml"
HH_RLHF = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def registry_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "runs"
    monkeypatch.setenv("RLHF_HOME", str(home))
    return home


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_parents(tmp_path_factory) -> dict:
    """One SFT policy (1 epoch) and one reward model (3 epochs) of the tiny pipeline, trained once for the whole
    session in a registry of their own: the PPO, sharding and chaos tests start from them by id (`ppo.sft_parent`,
    `ppo.rm_parent`, `rm.init`), under pipeline names of their own."""
    from rlhf.pipeline.config import load_pipeline
    from rlhf.pipeline.registry import Registry
    from rlhf.stages import rm, sft

    home = tmp_path_factory.mktemp("parents")
    registry = Registry(home)
    pipeline, _ = load_pipeline(TINY, ["sft.epochs=1", "rm.epochs=3"])
    policy = sft.run(pipeline, registry=registry, where="tiny")
    reward = rm.run(pipeline, registry=registry, where="tiny")
    return {"home": home, "sft": policy.id, "rm": reward.id}
