"""The networks PPO trains and consults: policy + value model in one module, reference, reward model.

Written by hand because no maintained library offers a per-token value head on a sequence-classification
checkpoint that still loads with `AutoModelForSequenceClassification` (TRL's lived in its removed PPO).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from rlhf.core.packing import pack_groups, position_ids, unpack_logits
from rlhf.errors import ModelError


def disable_dropout(model: nn.Module) -> None:
    """PPO ratios compare forward passes of one policy: dropout would make them noisy (Huang et al. 2024)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def score_head(model: PreTrainedModel) -> nn.Module:
    """The linear head of a decoder sequence-classification model (`score` in Llama, Qwen, GPT-2, ...)."""
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        raise ModelError(f"{type(model).__name__} has no one-output `score` head on per-token hidden states; "
                         f"a value model needs a decoder (set ppo.value_init: policy)")
    return head


@torch.no_grad()
def standardise_head(head: nn.Linear, *, mean: float, std: float) -> None:
    """Make a reward head output (raw - mean) / std, the normalised score PPO's returns are made of, so a value
    model initialised from the reward model starts on their scale (a raw RM can spread over +-20 while the
    returns stay near +-1: the first advantages would be mostly value error). Without a bias only the
    scale is matched; the mean offset is left for the value loss to learn."""
    if not std > 0:
        return
    head.weight.div_(std)
    if head.bias is not None:
        head.bias.sub_(mean).div_(std)


class ValueModel(nn.Module):
    """Per-token values from a sequence-classification checkpoint: its backbone, then its head at
    every position (the reward model reads the same head at the last token only)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        score_head(model)  # fails early on a checkpoint without a per-token head
        self.model = model  # the one registered child: its weights appear once in state dicts and checkpoints

    @property
    def head(self) -> nn.Linear:
        return score_head(self.model)

    @property
    def backbone(self) -> nn.Module:
        return getattr(self.model, self.model.base_model_prefix)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:  # -> (B, T)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


class PolicyAndValue(nn.Module):
    """Policy and value model as one module, so accelerate wraps (DDP, FSDP, ZeRO) and steps them together. The
    critic-free algorithms (grpo, rloo, reinforce_pp) have no value model: `value` is None."""

    def __init__(self, policy: PreTrainedModel, value: ValueModel | None):
        super().__init__()
        self.policy = policy
        self.value = value
        # accelerate's FSDP2 preparation reads the block classes to shard one by one off the root module;
        # without them it would shard only the root, gathering both whole models at once.
        self._no_split_modules = sorted({*(getattr(policy, "_no_split_modules", None) or []),
                                         *(getattr(value.model if value else None, "_no_split_modules", None)
                                           or [])})

    def tie_weights(self, **kwargs) -> None:
        """Tie each model's shared matrices again (an output head to its input embedding). accelerate calls
        this after moving the module to the meta device (FSDP2 `cpu_ram_efficient_loading`), which unties
        them: an untied head would be a parameter the optimiser never steps."""
        self.policy.tie_weights(**kwargs)
        if self.value is not None:
            self.value.model.tie_weights(**kwargs)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *, query_width: int,
                group: int = 1) -> tuple[Tensor, Tensor | None]:
        """(logits (B, Tr, V) predicting each response token, values (B, Tr) before each, or None without a value
        model) of sequences (B, Tq + Tr) whose responses start at column `query_width`. `group` > 1: the rows come
        in consecutive groups that share one prompt, whose policy pass runs once per group (`shared_prefix_logits`)."""
        logits = response_logits(self.policy, input_ids, attention_mask, query_width=query_width, group=group)
        return logits, self.values(input_ids, attention_mask, query_width=query_width)

    def values(self, input_ids: Tensor, attention_mask: Tensor, *, query_width: int) -> Tensor | None:
        """Values (B, Tr) before each response token, or None without a value model."""
        if self.value is None:
            return None
        return self.value(input_ids, attention_mask)[:, query_width - 1:-1]


def response_logits(model: nn.Module, sequences: Tensor, attention_mask: Tensor, *, query_width: int,
                    group: int = 1) -> Tensor:
    """Logits that predict each response token: (B, Tr, V) from sequences (B, Tq + Tr). The output head
    runs on the response positions only (`logits_to_keep`), which spares its largest matrix product.
    `group` > 1: `shared_prefix_logits`, the same logits with each group's prompt run once."""
    if group > 1:
        return shared_prefix_logits(model, sequences, attention_mask, query_width=query_width, group=group)
    keep = sequences.shape[1] - query_width + 1
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   use_cache=False, logits_to_keep=keep).logits
    return logits[:, :-1]


def shared_prefix_logits(model: nn.Module, sequences: Tensor, attention_mask: Tensor, *, query_width: int,
                         group: int, packed: bool | None = None) -> Tensor:
    """`response_logits` of rows that come in consecutive groups of `group` with one prompt (the responses
    sampled for it), each group's prompt run once: the same logits and gradients up to float rounding, for
    (group - 1) / group of the prompt's compute. Two ways: `packed` (one pass over the group packed into one row
    behind its prompt, rlhf/core/packing.py; models on SDPA attention, which takes the mask) or cached (the
    prompt's pass first, its keys and values then shared by the responses' pass as a KV cache; any attention).
    packed None: packed where the model can take it (`packs_groups`)."""
    if not (packs_groups(model) if packed is None else packed):
        return _cached_prefix_logits(model, sequences, attention_mask, query_width=query_width, group=group)
    layout = pack_groups(sequences, attention_mask, query_width=query_width, group=group)
    logits = model(input_ids=layout.input_ids, attention_mask=layout.attention_mask,
                   position_ids=layout.position_ids, use_cache=False, logits_to_keep=layout.logits_to_keep).logits
    return unpack_logits(logits, layout)


def packs_groups(model: nn.Module) -> bool:
    """Whether `shared_prefix_logits` packs the model's groups: its attention is torch's SDPA, which takes the packed
    layout's boolean mask as it is (eager attention adds its mask; flash-attention takes none), and every layer
    attends to the whole causal past: transformers hands a 4D mask to every layer unchanged, so a sliding-window or
    chunked layer (Mistral v0.1, Gemma 3, Qwen2 with use_sliding_window) would lose its window in the packed pass."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None and getattr(config, "attention_chunk_size", None) is None


def _cached_prefix_logits(model: nn.Module, sequences: Tensor, attention_mask: Tensor, *, query_width: int,
                          group: int) -> Tensor:
    """shared_prefix_logits in two passes: each group's prompt, then the responses with its keys and values (and
    their gradient) as a cache. A response token attends to exactly the prompt positions it would in a full pass
    (a 512-token prompt and 4 responses of 53 tokens: 724 positions, not 2,260)."""
    rows = sequences.shape[0]
    if rows % group:
        raise ValueError(f"shared_prefix_logits: {rows} rows do not split into groups of {group}")
    prompts, prompt_mask = sequences[::group, :query_width], attention_mask[::group, :query_width]
    cache = CACHE_ARGUMENT
    head = model(input_ids=prompts, attention_mask=prompt_mask, position_ids=position_ids(prompt_mask),
                 use_cache=True, logits_to_keep=1)
    shared = getattr(head, cache)
    shared.batch_repeat_interleave(group)  # each group's keys and values, once per response (autograd sums back)
    # The prompt's last position predicts the first response token; the response positions predict the rest.
    first = head.logits.repeat_interleave(group, dim=0)
    responses = model(input_ids=sequences[:, query_width:], attention_mask=attention_mask,
                      position_ids=position_ids(attention_mask)[:, query_width:], use_cache=True,
                      **{cache: shared}).logits
    return torch.cat([first, responses[:, :-1]], dim=1)


def _cache_argument() -> str:
    """What this transformers calls a forward pass's KV cache, as keyword and output field: `cache` from 5.2x,
    `past_key_values` before (the GPU image's 5.17)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


CACHE_ARGUMENT = _cache_argument()


def same_tokenizer(a, b) -> bool:
    """Whether token ids mean the same text in both tokenizers (then ids pass between models as they are)."""
    return a.get_vocab() == b.get_vocab() and a.pad_token_id == b.pad_token_id and a.eos_token_id == b.eos_token_id
