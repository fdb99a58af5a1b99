"""TRL's RewardTrainer with the language-model regulariser of rlhf/training/reward_lm.py (`rm.lm_loss_coef`).

The pairwise loss is TRL's, unchanged; while training, `coef x` the next-token loss of the chosen responses (the
first half of each batch: TRL's collator puts the chosen sides first; their prompts are not predicted) is added to
it. Evaluation reports the pairwise loss alone, so `rm.best_metric: loss` compares like with like.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from rlhf.errors import ConfigError
from rlhf.training.models import load_causal_lm
from rlhf.training.reward_lm import backbone, next_token_loss, output_embedding

PROMPT_LENGTH = "chosen_prompt_length"  # a training row's field (rm.tokenize_pairs): chosen_ids' prompt tokens


class PreferenceWithResponseMask(DataCollatorForPreference):
    """TRL's preference collator, plus `response_mask` (B, L) over the chosen rows: 1 on their response tokens,
    from each example's `chosen_prompt_length` (examples without it, held-out pairs, get none)."""

    def torch_call(self, examples: list[dict]) -> dict:
        lengths = [example.get(PROMPT_LENGTH) for example in examples]
        batch = super().torch_call(examples)
        if None not in lengths:
            chosen = batch["attention_mask"][:len(examples)]
            positions = torch.arange(chosen.shape[1])
            batch["response_mask"] = chosen * (positions[None, :] >= torch.tensor(lengths)[:, None])
        return batch


class LMRegularisedRewardTrainer(RewardTrainer):
    """RewardTrainer whose training loss adds `lm_loss_coef` x the chosen responses' next-token loss through
    `lm_head_weight` (V, H), a frozen copy of the starting policy's output embedding. Training rows carry
    `chosen_prompt_length`; without it (a batch from elsewhere) the whole chosen sequence is predicted."""

    def __init__(self, *args, lm_loss_coef: float, lm_head_weight: Tensor, **kwargs):
        collator = PreferenceWithResponseMask(pad_token_id=kwargs["processing_class"].pad_token_id,
                                              pad_to_multiple_of=kwargs["args"].pad_to_multiple_of)
        kwargs.setdefault("data_collator", collator)
        super().__init__(*args, **kwargs)
        self.lm_loss_coef = lm_loss_coef
        self.lm_head_weight = lm_head_weight

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if PROMPT_LENGTH not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, PROMPT_LENGTH]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        response_mask = inputs.pop("response_mask", None)
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        captured: list[Tensor] = []
        hook = backbone(model).register_forward_hook(lambda _module, _args, out: captured.append(out[0]))
        try:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        finally:
            hook.remove()
        half = inputs["input_ids"].shape[0] // 2
        hidden = captured[-1][:half]
        self.lm_head_weight = self.lm_head_weight.to(hidden.device)  # once: a no-op from then on
        lm = next_token_loss(hidden, self.lm_head_weight, inputs["input_ids"][:half], inputs["attention_mask"][:half],
                             target_mask=response_mask)
        self._metrics["train"]["lm_loss"].append(self.accelerator.gather_for_metrics(lm.detach()).mean().item())
        loss = loss + self.lm_loss_coef * lm
        return (loss, outputs) if return_outputs else loss


def lm_head_for(init_path: str, model: PreTrainedModel, *, trust_remote_code: bool,
                allow_pickle: bool) -> tuple[Tensor | None, str]:
    """(the output embedding (V', H) of the causal LM at `init_path`, zero rows added up to `model`'s vocabulary
    (a pad token the reward model was given); "") or, when `init_path` loads as a causal LM only with weights made
    up (an encoder, or a reward model with an untied head: its language-model head is gone), (None, why).

    `model` is the reward model just loaded from `init_path`, not yet trained. A causal LM whose head is tied to its
    input embedding (Qwen2.5 up to 3B, Gemma, the tiny model) needs no second load: that head is the reward model's
    own input embedding, less any rows added since. An untied one (Llama 7B, Mistral) saved as safetensors in a
    folder gives its head alone from the files; otherwise the checkpoint is loaded again as a causal LM."""
    config = AutoConfig.from_pretrained(init_path, trust_remote_code=trust_remote_code)
    if getattr(config, "tie_word_embeddings", False) and any(
            name.endswith("ForCausalLM") for name in getattr(config, "architectures", None) or []):
        weight = model.get_input_embeddings().weight.detach()[:config.vocab_size].float().clone()
    else:
        weight = _saved_head(init_path, config, trust_remote_code=trust_remote_code)
    if weight is None:
        causal, info = load_causal_lm(init_path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                      output_loading_info=True)
        weight, missing = output_embedding(causal), sorted(info.get("missing_keys", []))
        del causal
        if weight is None or missing:
            return None, (f"{init_path} has no language-model head to predict tokens with (missing: "
                          f"{', '.join(missing[:3]) or 'an output embedding'})")
    vocab, width = model.get_input_embeddings().weight.shape
    if weight.shape[1] != width:
        raise ConfigError(f"rm.lm_loss_coef: the language-model head of {init_path} is {weight.shape[1]} wide, the "
                          f"reward model's hidden states {width}")
    if weight.shape[0] < vocab:
        weight = torch.cat([weight, weight.new_zeros(vocab - weight.shape[0], width)])
    return weight, ""


def _saved_head(init_path: str, config, *, trust_remote_code: bool) -> Tensor | None:
    """The output embedding of the causal LM `config` describes, read alone (float32) from the safetensors files of
    the folder `init_path`: a 7B start's head without a second 7B model in memory. None when `init_path` is not
    such a folder or its files do not hold that tensor (a reward model's folder, whose head is a score head)."""
    folder = Path(init_path)
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if not (index.is_file() or single.is_file()):
        return None
    try:
        with init_empty_weights():  # the parameter's name, from a skeleton with no storage
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError:  # no causal-LM class for this config: the full load says what is wrong
        return None
    head = skeleton.get_output_embeddings()
    name = None if head is None else next((n for n, p in skeleton.named_parameters() if p is head.weight), None)
    if name is None:
        return None
    file = folder / json.loads(index.read_text())["weight_map"].get(name, "") if index.is_file() else single
    if not file.is_file():
        return None
    with safe_open(str(file), framework="pt") as tensors:
        names = tensors.keys()
        return tensors.get_tensor(name).float() if name in names else None
