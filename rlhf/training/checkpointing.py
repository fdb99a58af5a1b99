"""Activation (gradient) checkpointing under either of transformers 5's names for it.

transformers 5.x renamed `gradient_checkpointing` to `activation_checkpointing` part-way through the 5 series (the
TrainingArguments field and the model method); older 5.x releases (5.17 on the GPU image we test on) know only the
old name, newer ones keep it as a deprecated alias. These two helpers use the new name where it exists.
"""

from __future__ import annotations

import dataclasses

from transformers import PreTrainedModel, TrainingArguments


def checkpointing_field() -> str:
    """The TrainingArguments field that switches checkpointing on, in the installed transformers."""
    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them (train mode only)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable()
