"""The `base` stage: register the pipeline's starting model so later stages can name it as a parent.

For `model: tiny` this builds the model and trains its tokenizer on every text of the pipeline's own data
sets, so no text in them tokenizes to an unknown token. A hub id or folder is registered as it is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.pipeline import model_card
from rlhf.pipeline.config import DataSource, Pipeline
from rlhf.pipeline.data import all_texts, load_records
from rlhf.pipeline.registry import Entry, Registry, hash_config
from rlhf.pipeline.schema import as_plain
from rlhf.training import tiny
from rlhf.training.models import ModelRef, resolve_model_ref

_SOURCE_KEYS = ("dataset", "eval_dataset", "eval_prompts")


def pipeline_sources(pipeline: Pipeline) -> list[DataSource]:
    """Every data set the pipeline file names, in stage order."""
    sources = []
    for stage in (pipeline.sft, pipeline.rm, pipeline.ppo):
        if stage is None:
            continue
        values = stage if isinstance(stage, dict) else as_plain(stage)
        for key in _SOURCE_KEYS:
            value = values.get(key)
            if isinstance(value, str):
                sources.append(DataSource(path=value))
            elif isinstance(value, dict) and "path" in value:
                sources.append(DataSource(**value))
    return sources


def ensure_base(pipeline: Pipeline, registry: Registry, *, where: str, build: bool = True) -> Entry | None:
    """The complete base entry for this pipeline's `model`, building and registering it if needed; with
    `build=False` (`rlhf plan`), None when it does not exist yet."""
    ref = resolve_model_ref(pipeline.model, where=where)
    if ref.kind == "tiny":
        return ensure_built(pipeline, registry, kind="tiny", spec=pipeline.tiny,
                            build=tiny.build_tiny if build else None)
    return register_external(pipeline, registry, ref, create=build)


def register_external(pipeline: Pipeline, registry: Registry, ref: ModelRef, *, create: bool = True) -> Entry | None:
    """Record a hub model or local folder as a `base` entry (nothing is downloaded or copied)."""
    config = {"model": ref.value, "kind": ref.kind}
    fingerprint = _folder_fingerprint(Path(ref.value)) if ref.kind == "folder" else ""
    found = registry.find_complete(stage="base", pipeline=pipeline.name, config_hash=hash_config(config),
                                   data_fingerprint=fingerprint, parents=[])
    if found or not create:
        return found
    entry = registry.create(stage="base", pipeline=pipeline.name, parents=[], config=config,
                            config_hash=hash_config(config), data_fingerprint=fingerprint,
                            info={"source": ref.kind})
    Path(entry.path).rmdir()  # nothing is written: the weights stay where they are
    registry.update(entry.id, path=ref.value)
    return registry.complete(entry.id, metrics={})


def ensure_built(pipeline: Pipeline, registry: Registry, *, kind: str, spec: Any,
                 build: Callable[..., tuple[PreTrainedModel, PreTrainedTokenizerBase]] | None) -> Entry | None:
    """Build a tiny model (`kind` tiny or tiny-encoder) whose tokenizer is trained on the pipeline's
    texts, save it and register it as a `base` entry; reuse an identical earlier one. `build=None`: only look."""
    texts = [text for source in pipeline_sources(pipeline) for text in all_texts(load_records(source).rows)]
    config = {"model": kind, kind: as_plain(spec), "seed": pipeline.seed}
    fingerprint = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()[:16]
    found = registry.find_complete(stage="base", pipeline=pipeline.name, config_hash=hash_config(config),
                                   data_fingerprint=fingerprint, parents=[])
    if found or build is None:
        return found
    entry = registry.create(stage="base", pipeline=pipeline.name, parents=[], config=config,
                            config_hash=hash_config(config), data_fingerprint=fingerprint, info={"source": kind})
    try:
        model, tokenizer = build(texts, spec, seed=pipeline.seed)
        model.save_pretrained(entry.path, safe_serialization=True)
        tokenizer.save_pretrained(entry.path)
    except BaseException as err:
        registry.fail(entry.id, error=f"building the {kind} model failed: {err}")
        raise
    metrics = {"num_parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer)}
    model_card.write(entry, parents=[], metrics=metrics)
    return registry.complete(entry.id, metrics=metrics)


def _folder_fingerprint(folder: Path) -> str:
    """Cheap identity of a local model folder: its config and the names and sizes of its files."""
    listing = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file())
    return hash_config({"config": (folder / "config.json").read_text(encoding="utf-8"), "files": listing})
