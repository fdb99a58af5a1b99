"""PPO's optimiser groups: the policy's trained parameters first, then the value model's; under LoRA the adapter
trains at `ppo.lora.learning_rate` when set, beside a value model at the stage's rate."""

from __future__ import annotations

import pytest
import torch
from peft import TaskType, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf.pipeline.config import DataSource, PPOLoraSettings, PPOStage
from rlhf.training.models import lora_config
from rlhf.training.ppo.models import PolicyAndValue, ValueModel
from rlhf.training.ppo.setup import make_optimiser

SHAPE = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, pad_token_id=0)


def models(*, lora: bool, value: bool) -> PolicyAndValue:
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(**SHAPE))
    if lora:
        policy = get_peft_model(policy, lora_config(PPOLoraSettings(r=4), task_type=TaskType.CAUSAL_LM))
    critic = ValueModel(LlamaForSequenceClassification(LlamaConfig(**SHAPE, num_labels=1))) if value else None
    return PolicyAndValue(policy, critic)


def stage(**kwargs) -> PPOStage:
    return PPOStage(dataset=DataSource(path="p.jsonl"), learning_rate=3e-4, **kwargs)


def rates(optimiser) -> list[tuple[float, int]]:
    return [(group["lr"], sum(p.numel() for p in group["params"])) for group in optimiser.param_groups]


def test_lora_adapter_trains_at_its_own_rate_and_the_value_model_at_the_stage_rate():
    model = models(lora=True, value=True)
    optimiser, scheduler = make_optimiser(model, stage(mode="lora", lora=PPOLoraSettings(r=4, learning_rate=2e-3)),
                                          steps=10)
    adapter = sum(p.numel() for n, p in model.policy.named_parameters() if "lora_" in n)
    value = sum(p.numel() for p in model.value.parameters())
    assert rates(optimiser) == [(2e-3, adapter), (3e-4, value)]
    assert scheduler.get_last_lr() == pytest.approx([2e-3, 3e-4])  # the policy's rate comes first (logged)
    optimiser.step()  # no gradients: nothing moves
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([2e-3 * 0.9, 3e-4 * 0.9])  # one linear schedule scales both


@pytest.mark.parametrize("mode, lora_rate, value", [("lora", None, True), ("full", 2e-3, True), ("full", None, False)])
def test_without_an_adapter_rate_every_parameter_trains_at_the_stage_rate(mode, lora_rate, value):
    model = models(lora=mode == "lora", value=value)
    optimiser, _ = make_optimiser(model, stage(mode=mode, lora=PPOLoraSettings(r=4, learning_rate=lora_rate)),
                                  steps=10)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert {lr for lr, _ in rates(optimiser)} == {3e-4}
    assert sum(n for _, n in rates(optimiser)) == trained
