"""A language-model regulariser for reward models: next-token loss on the chosen sequences, read from the hidden
states the score head reads, through the starting policy's output embedding.

A reward model fine-tuned on a few thousand pairs can fit them by memorising which words went with which prompt,
forgetting the language features its SFT start gave it (Yang et al. 2024, "Regularizing Hidden States Enables
Learning Generalizable Reward Model for LLMs"). Asking the same hidden states to keep predicting the next token of
the preferred text holds them near a language model's. `rm.lm_loss_coef` in the pipeline file weighs this term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel


def next_token_loss(hidden: Tensor, weight: Tensor, ids: Tensor, mask: Tensor, *,
                    target_mask: Tensor | None = None) -> Tensor:
    """Mean cross-entropy of predicting ids[:, t + 1] from hidden[:, t] with logits hidden @ weight.T.

    hidden (B, L, H) final hidden states (after the model's last norm); weight (V, H) an output embedding; ids and
    mask (B, L), right- or left-padded: a token is a target where it and the position predicting it are real
    tokens and, given `target_mask` (B, L), where that is set too (the response's tokens, say). Equals a causal LM's
    own `labels` loss when `weight` is its head. Logits are computed in float32.
    """
    logits = hidden[:, :-1].float() @ weight.float().T
    counted = mask[:, 1:].bool() & mask[:, :-1].bool()
    if target_mask is not None:
        counted = counted & target_mask[:, 1:].bool()
    targets = ids[:, 1:].masked_fill(~counted, -100)
    if not (targets != -100).any():
        return logits.sum() * 0.0  # no target: zero, still attached to the graph
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def output_embedding(model: PreTrainedModel) -> Tensor | None:
    """A detached float32 copy of `model`'s output embedding (V, H), or None when it has none."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        return None
    return head.weight.detach().float().clone()


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer inside a (DDP- or PEFT-wrapped) sequence-classification model, whose output's first
    element is the final hidden states (B, L, H)."""
    while hasattr(model, "module"):  # DistributedDataParallel
        model = model.module
    if hasattr(model, "get_base_model"):  # PeftModel
        model = model.get_base_model()
    return model.base_model
