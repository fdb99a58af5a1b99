"""PPO's rollout, evaluation, saving and an optimiser step on an FSDP2-sharded policy and value model, two CPU
processes (gloo).

    python -m torch.distributed.run --nproc_per_node 2 tests/sharded_ppo.py OUT_DIR full|lora

Run by tests/test_sharding.py. accelerate's Accelerator enables FSDP on GPUs only, so neither the PPO stage nor
its Accelerator is used here: this calls the function `prepare` runs under FSDP2 (`fsdp2_prepare_model`)
itself, with the settings of accelerate/fsdp.yaml (blocks found from the model, CPU-RAM-efficient loading), and
checks each result against an unsharded copy of the same weights on the same inputs. The step is AdamW on each
process's own batch; FSDP2 averages the gradients, so the copy steps on the mean of the processes' losses.
"""

from __future__ import annotations

import copy
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from peft import LoraConfig, TaskType, get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.core.maths import logprobs_from_logits, masked_mean
from rlhf.core.prompts import PromptSet, left_pad
from rlhf.core.sampling import sample, sampling_config
from rlhf.training.models import decoder_layers, environment, whole_models
from rlhf.training.ppo.evaluate import evaluate, shard, summarise
from rlhf.training.ppo.models import PolicyAndValue, ValueModel, response_logits
from rlhf.training.ppo.scorer import RewardScorer
from rlhf.training.ppo.setup import Loaded, save_models
from rlhf.training.ppo.sharding import gathered, sharding_of
from rlhf.training.ppo.steps import Models
from rlhf.training.tiny import TinyModelSpec, build_model, build_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "the sun is warm today"]
RESPONSE_TOKENS = 3  # the last tokens of each text stand for a response in the optimiser step's loss
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


class FSDP2Saver:
    """What accelerate's Accelerator does for `save_models` under FSDP2: a full state dict, gathered."""

    def __init__(self, rank: int):
        self.is_main_process = rank == 0
        self.state = SimpleNamespace()  # no DeepSpeed plugin

    def get_state_dict(self, model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def build(mode: str):
    torch.manual_seed(0)  # the heads and adapters initialised here are the same on every process
    tokenizer = build_tokenizer(TEXTS * 20, vocab_size=300)
    spec = TinyModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2)
    policy = build_model(spec, tokenizer, seed=0)
    folder = Path(sys.argv[1]) / "base"
    if dist.get_rank() == 0:
        policy.save_pretrained(folder)
    dist.barrier()
    value_base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    if mode == "lora":
        policy = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   task_type=TaskType.CAUSAL_LM, lora_dropout=0.0))
        with torch.no_grad():  # a trained-looking adapter, so that merging it changes the weights
            generator = torch.Generator().manual_seed(1)
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model = PolicyAndValue(policy, ValueModel(value_base))
    scorer = RewardScorer(model=reward, tokenizer=tokenizer, policy_tokenizer=tokenizer, stats=None, max_length=64,
                          batch_size=4)
    return model, tokenizer, scorer


def fsdp2(model: PolicyAndValue, rank: int) -> PolicyAndValue:
    """What accelerate's `prepare` does to the model under accelerate/fsdp.yaml."""
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            cpu_ram_efficient_loading=True, reshard_after_forward=True,
                                            state_dict_type="FULL_STATE_DICT")
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                  parallelism_config=None, mixed_precision="no", is_main_process=rank == 0,
                                  device=torch.device("cpu"))
    return fsdp2_prepare_model(accelerator, model)


def fresh_head_on_meta(folder: Path, *, guarded: bool) -> bool:
    """Whether a value model's new head (missing from the checkpoint) is left on the meta device when loaded
    with FSDP's CPU-RAM-efficient loading switched on, as `accelerate launch` does on every process."""
    guard = whole_models(SimpleNamespace(state=SimpleNamespace())) if guarded else nullcontext()
    with environment(ACCELERATE_USE_FSDP="true", FSDP_CPU_RAM_EFFICIENT_LOADING="true"), guard:
        value = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    return any(p.is_meta for p in value.parameters())


def training_batches(tokenizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(sequences, attention mask) for each process, built from TEXTS alone so that every process can rebuild
    every other's: process r takes its own rows."""
    sequences, attention = left_pad([tokenizer(t)["input_ids"] for t in TEXTS], pad_token_id=tokenizer.pad_token_id)
    processes = dist.get_world_size()
    return [(sequences[r::processes], attention[r::processes]) for r in range(processes)]


def step_loss(model: PolicyAndValue, sequences: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """A loss on both heads: the policy's negative log-likelihood of the last RESPONSE_TOKENS tokens plus the
    values' squared error to a return of 1 before each."""
    width = sequences.shape[1] - RESPONSE_TOKENS
    logits, values = model(sequences, attention, query_width=width)
    logprobs = logprobs_from_logits(logits, sequences[:, width:])
    return masked_mean(-logprobs + (values.float() - 1.0) ** 2, attention[:, width:])


def optimiser_step(model: PolicyAndValue, whole: PolicyAndValue, *,
                   batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """One AdamW step on the shards, each process on its own batch, and one on the whole copy on the mean of
    all the processes' losses (FSDP2 averages gradients over processes); then both on every batch."""
    rank = dist.get_rank()
    trainable = [p for p in model.parameters() if p.requires_grad]  # DTensors: each process's shards
    optimiser = torch.optim.AdamW(trainable, **ADAMW)
    whole_optimiser = torch.optim.AdamW([p for p in whole.parameters() if p.requires_grad], **ADAMW)
    with torch.no_grad():
        before = [p.full_tensor() for p in trainable]  # every process gathers the same tensors in turn
        whole_before = [whole(seq, att, query_width=seq.shape[1] - RESPONSE_TOKENS) for seq, att in batches]

    step_loss(model, *batches[rank]).backward()
    report = {"grads": all(p.grad is not None for p in trainable)}
    optimiser.step()
    torch.stack([step_loss(whole, *batch) for batch in batches]).mean().backward()
    whole_optimiser.step()

    with torch.no_grad():
        report["step_changed_weights"] = all(not torch.equal(a, p.full_tensor()) for a, p in zip(before, trainable))
        matches, moved = [], []
        for (seq, att), (old_logits, old_values) in zip(batches, whole_before):
            width = seq.shape[1] - RESPONSE_TOKENS
            logits, values = model(seq, att, query_width=width)
            whole_logits, whole_values = whole(seq, att, query_width=width)
            matches.append(torch.allclose(logits, whole_logits, atol=1e-5)
                           and torch.allclose(values, whole_values, atol=1e-5))
            # a step too small to show at that tolerance would let the comparison pass whatever the shards did
            moved.append(not torch.allclose(whole_logits, old_logits, atol=1e-3)
                         and not torch.allclose(whole_values, old_values, atol=1e-3))
    return report | {"optimiser_step_matches": all(matches), "step_moved_outputs": all(moved)}


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, tokenizer, scorer = build(mode)
    whole = copy.deepcopy(model)
    report: dict = {"fresh_head_on_meta": fresh_head_on_meta(out / "base", guarded=True)}
    model = fsdp2(model, rank)
    report |= {"sharding": sharding_of(model), "whole_sharding": sharding_of(whole)}
    assert isinstance(model, FSDPModule)
    # Each decoder block its own unit (the root alone would gather both whole models at once), and the policy's
    # output head tied to its embedding again after the trip through the meta device.
    report["blocks_sharded"] = all(isinstance(layer, FSDPModule)
                                   for owner in (model.policy, model.value.model) for layer in decoder_layers(owner)[1])
    base = model.policy.get_base_model() if mode == "lora" else model.policy
    report["head_tied"] = base.lm_head.weight is base.model.embed_tokens.weight
    report["parameters"] = [len(list(model.parameters())), len(list(whole.parameters()))]

    # Each process its own prompts, and responses of different lengths: generation must stay in step.
    prompts = PromptSet(ids=[tokenizer(t)["input_ids"] for t in TEXTS * 3], texts=TEXTS * 3, truncated=0,
                        skipped=0)
    mine = [prompts.ids[i] for i in range(rank, 3 + 2 * rank)]
    queries, query_mask = left_pad(mine, pad_token_id=tokenizer.pad_token_id)
    generation = sampling_config(max_new_tokens=4 + 8 * rank, temperature=1.0, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    models = Models(policy_and_value=model, reference=None if mode == "lora" else whole.policy, scorer=scorer)
    whole_set = Models(policy_and_value=whole, reference=None if mode == "lora" else whole.policy, scorer=scorer)
    with torch.no_grad(), gathered(model) as synced:
        report["synced"] = synced
        report["whole_inside"] = not any(isinstance(p, DTensor) for p in model.parameters())
        sampled = sample(model.policy, queries, query_mask, config=generation, micro_batch_size=2, synced=synced)
        sequences = torch.cat([queries, sampled.responses], dim=1)
        attention = torch.cat([query_mask, sampled.response_mask.long()], dim=1)
        width = queries.shape[1]
        # direct calls on the policy, as generation and the LoRA reference make them
        sharded_logits = response_logits(model.policy, sequences, attention, query_width=width)
        sharded_ref = models.reference_logits(sequences, attention, query_width=width)
        sharded_values = model(sequences, attention, query_width=width)[1]
    with torch.no_grad():
        report["logits_match"] = torch.allclose(
            sharded_logits, response_logits(whole.policy, sequences, attention, query_width=width), atol=1e-5)
        report["reference_match"] = torch.allclose(
            sharded_ref, whole_set.reference_logits(sequences, attention, query_width=width), atol=1e-5)
        report["values_match"] = torch.allclose(sharded_values, whole(sequences, attention, query_width=width)[1],
                                                atol=1e-5)
    report["response_width"] = sampled.responses.shape[1]
    report["sharded_after"] = all(isinstance(p, DTensor) for p in model.parameters())

    # The evaluation: each process its share, gathered; the same numbers as the whole model on those shares.
    evaluation = sampling_config(max_new_tokens=6, temperature=1.0, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    reference = lambda seq, att, w: models.reference_logits(seq, att, query_width=w)  # noqa: E731
    whole_reference = lambda seq, att, w: whole_set.reference_logits(seq, att, query_width=w)  # noqa: E731
    indices = shard(len(prompts.ids) - 1, rank=rank, processes=2)  # 11 prompts: one process repeats one
    common = dict(indices=indices, generation=evaluation, temperature=1.0, batch_size=2, seed=7 + rank,
                  gold=lambda prompt, text: float(len(text)), device=torch.device("cpu"))
    with gathered(model) as synced:
        local = evaluate(model.policy, reference, scorer, prompts, tokenizer, synced=synced, **common)
    expected = evaluate(whole.policy, whole_reference, scorer, prompts, tokenizer, **common)
    report["eval_matches_whole"] = [(r.response, r.gold) for r in local] == [(r.response, r.gold) for r in expected] \
        and all(abs(a.kl - b.kl) < 1e-4 and abs(a.score - b.score) < 1e-4 for a, b in zip(local, expected))
    everything = [None, None]
    dist.all_gather_object(everything, local)
    summary = summarise(everything[0] + everything[1], prompts.texts)
    report["eval_prompts"] = len({r.index for part in everything for r in part})
    report["eval_gold"] = summary.gold

    # Saving: whole weights gathered from the shards; under LoRA merged from a copy, the shards untouched.
    folder = out / f"saved-{mode}"
    loaded = Loaded(tokenizer=tokenizer, policy_and_value=model, reference=None, scorer=scorer, value_source="rm")
    save_models(FSDP2Saver(rank), model, loaded, folder=folder)
    dist.barrier()
    if rank == 0:
        saved = AutoModelForCausalLM.from_pretrained(folder).eval()
        # merged from a copy: `whole` goes on to take the optimiser step below beside the shards
        merged = copy.deepcopy(whole.policy).merge_and_unload() if mode == "lora" else whole.policy
        with torch.no_grad():
            report["saved_policy_matches"] = torch.allclose(
                response_logits(saved, sequences, attention, query_width=width),
                response_logits(merged, sequences, attention, query_width=width), atol=1e-5)
        report["adapter_saved"] = (folder / "adapter" / "adapter_model.safetensors").is_file()
        value = AutoModelForSequenceClassification.from_pretrained(folder / "value_model").eval()
        report["saved_value_matches"] = all(torch.equal(a, b) for a, b in zip(
            value.state_dict().values(), whole.value.model.state_dict().values()))

    # A training step through the root module on the shards, after everything above gathered and resharded
    # them; last, so that the checks above compare the weights both copies started with.
    report |= optimiser_step(model, whole, batches=training_batches(tokenizer))
    (out / f"report-{mode}-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
