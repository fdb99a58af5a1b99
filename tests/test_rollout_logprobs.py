"""`ppo.rollout_logprobs`: the log-probabilities recorded while sampling must be those a full forward pass gives (left
padding, responses that stop early, several generate calls), sampling must draw the same tokens with or without
recording, a rollout that has them must skip the policy pass but still run the value model, and auto must pick
sampling exactly where the numbers agree."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig

from rlhf.core import maths
from rlhf.core.prompts import left_pad
from rlhf.core.sampling import sample, sampling_config
from rlhf.errors import ConfigError
from rlhf.pipeline.config import TinyModelSpec, load_pipeline
from rlhf.training.ppo.models import PolicyAndValue, response_logits
from rlhf.training.ppo.steps import Models, collect_rollout, logprobs_from_sampling
from rlhf.training.tiny import build_model, build_tokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "pipelines" / "tiny.yaml"
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def setting():
    tokenizer = build_tokenizer(["the cat sat on the mat", "a dog ran far away"] * 20, vocab_size=300)
    spec = TinyModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = build_model(spec, tokenizer, seed=0).eval()
    with torch.no_grad():  # sharper next-token distributions than a random model's, so that some pick EOS
        model.model.norm.weight.mul_(8.0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, len(tokenizer), (n,), generator=g).tolist() for n in (7, 2, 5, 4, 6, 3)]
    queries, mask = left_pad(prompts, pad_token_id=tokenizer.pad_token_id)
    config = sampling_config(max_new_tokens=10, temperature=TEMPERATURE, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    found = SimpleNamespace(model=model, queries=queries, mask=mask, config=config)
    # "EOS" from here on: the second token of the first response, which the same seed then draws again and stops at
    config.eos_token_id = int(draw(found, with_logprobs=False).responses[0, 1])
    return found


def draw(setting, *, with_logprobs: bool):
    torch.manual_seed(3)
    return sample(setting.model, setting.queries, setting.mask, config=setting.config, micro_batch_size=4,
                  with_logprobs=with_logprobs)


def test_recorded_logprobs_are_the_full_pass_ones_and_the_draw_is_unchanged(setting):
    plain, recorded = draw(setting, with_logprobs=False), draw(setting, with_logprobs=True)
    assert plain.logprobs is None
    assert torch.equal(plain.responses, recorded.responses) and torch.equal(plain.response_mask,
                                                                            recorded.response_mask)
    lengths = recorded.response_mask.sum(dim=1)
    assert lengths.min() < recorded.responses.shape[1] and recorded.has_eos.any()  # some stop early
    sequences = torch.cat([setting.queries, recorded.responses], dim=1)
    attention = torch.cat([setting.mask, recorded.response_mask.long()], dim=1)
    with torch.no_grad():
        logits = response_logits(setting.model, sequences, attention, query_width=setting.queries.shape[1])
    full = maths.logprobs_from_logits(logits, recorded.responses, temperature=TEMPERATURE)
    mask = recorded.response_mask
    assert torch.allclose(recorded.logprobs[mask], full[mask], atol=1e-5)
    assert (recorded.logprobs[~mask] == 0).all() and (recorded.logprobs[mask] < 0).all()


def test_a_rollout_with_recorded_logprobs_skips_the_policy_pass_but_not_the_value_model(setting):
    class Value(torch.nn.Module):  # per-token values that depend on the tokens: the value pass must still run
        model = torch.nn.Identity()  # what PolicyAndValue reads the block classes from

        def forward(self, input_ids, attention_mask):
            return input_ids.float() / 100

    policy_calls = []
    model = setting.model
    model.register_forward_hook(lambda *_: policy_calls.append(1))
    scorer = SimpleNamespace(raw=lambda q, qm, r, rm: r.float().sum(dim=1),
                             normalise=lambda raw, enabled: raw)
    models = Models(policy_and_value=PolicyAndValue(model, Value()), reference=model, scorer=scorer)
    cfg = load_pipeline(TINY)[0].ppo
    rollouts = {}
    for with_logprobs in (False, True):
        sampled = draw(setting, with_logprobs=with_logprobs)
        policy_calls.clear()
        rollouts[with_logprobs] = collect_rollout(models, setting.queries, setting.mask, sampled, cfg=cfg,
                                                  micro_batch_size=3)
        # the reference pass is this same model: 2 micro batches each, plus the policy's without recorded logprobs
        assert len(policy_calls) == (2 if with_logprobs else 4)
    recomputed, recorded = rollouts[False], rollouts[True]
    mask = recorded.response_mask
    assert torch.allclose(recorded.logprobs[mask], recomputed.logprobs[mask], atol=1e-5)
    assert torch.equal(recorded.values, recomputed.values) and recorded.values.abs().sum() > 0
    assert torch.equal(recorded.ref_logprobs, recomputed.ref_logprobs)


def test_auto_records_in_fp32_only_and_the_setting_decides_otherwise():
    cfg = load_pipeline(TINY)[0].ppo
    assert cfg.rollout_logprobs == "auto"
    assert logprobs_from_sampling(cfg, mixed_precision="no")
    assert not logprobs_from_sampling(cfg, mixed_precision="bf16")
    assert not logprobs_from_sampling(cfg, mixed_precision="fp16")
    fixed = load_pipeline(TINY, ["ppo.min_new_tokens=24"])[0].ppo  # EOS suppressed while sampling: recompute
    assert not logprobs_from_sampling(fixed, mixed_precision="no")
    assert logprobs_from_sampling(load_pipeline(TINY, ["ppo.rollout_logprobs=sampling"])[0].ppo,
                                  mixed_precision="bf16")
    assert not logprobs_from_sampling(load_pipeline(TINY, ["ppo.rollout_logprobs=forward"])[0].ppo,
                                      mixed_precision="no")


def test_sampling_with_suppressed_eos_is_refused_by_name():
    with pytest.raises(ConfigError, match="rollout_logprobs' sampling .* min_new_tokens"):
        load_pipeline(TINY, ["ppo.rollout_logprobs=sampling", "ppo.min_new_tokens=4"])


@pytest.mark.parametrize("adapter", [False, True])
def test_sampling_takes_nothing_from_the_checkpoint_generation_config(setting, adapter):
    """generate fills what our sampling config leaves unset from the checkpoint's generation_config.json; banned
    n-grams, suppressed tokens or a min-p cut-off there must not change what is drawn (the same tokens as without
    them, the recorded log-probabilities still a full pass's), and the checkpoint's config is left as it was."""
    before = draw(setting, with_logprobs=True)
    policy = get_peft_model(setting.model, LoraConfig(r=2, target_modules=["q_proj"])) if adapter else setting.model
    changing = dict(no_repeat_ngram_size=1, min_p=0.5,
                    suppress_tokens=sorted({int(t) for t in before.responses[before.response_mask]})[:3])
    own = setting.model.generation_config
    saved = own.to_dict()
    own.update(**changing)
    try:
        torch.manual_seed(3)
        after = sample(policy, setting.queries, setting.mask, config=setting.config, micro_batch_size=4,
                       with_logprobs=True)
        assert torch.equal(after.responses, before.responses)
        assert torch.allclose(after.logprobs, before.logprobs, atol=1e-6)
        assert setting.model.generation_config is own and own.no_repeat_ngram_size == 1
    finally:
        setting.model.generation_config = GenerationConfig.from_dict(saved)
        if adapter:
            policy.unload()
    # The control: the same settings given to generate directly do draw something else.
    banned = copy.deepcopy(setting.config)
    banned.update(**changing)
    torch.manual_seed(3)
    drawn = sample(setting.model, setting.queries, setting.mask, config=banned, micro_batch_size=4)
    assert not torch.equal(drawn.responses, before.responses)
