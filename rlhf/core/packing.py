"""Token layouts for forward passes: positions over real tokens, and groups of responses packed behind their shared
prompt (`ppo.shared_prefix`). Tensors in, tensors out.

A group of `group` rows that share one left-padded prompt (Tq columns) and carry right-padded responses (Tr columns)
becomes one packed row: the prompt once, then each response in its own slot of Tr columns,

    [ prompt (Tq) | response 0 (Tr) | response 1 (Tr) | ... ]          Tq + group x Tr columns, not group x (Tq + Tr)

with positions that restart after the prompt in every slot and an attention mask under which a response token sees
the prompt's real tokens and the tokens before it in its own slot, exactly what it sees in its own row. The logits
(and the gradients through them) are then those of the unpacked rows, for one pass over the prompt instead of
`group`: the prefix sharing of tree attention, written as one ordinary forward pass with a custom SDPA mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so left padding does not shift them: (B, T)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


@dataclass(frozen=True)
class PackedGroups:
    input_ids: Tensor  # (G, Tq + group x Tr)
    position_ids: Tensor  # (G, Tq + group x Tr)
    attention_mask: Tensor  # (G, 1, T, T) bool: query row may attend to key column (SDPA's convention)
    group: int
    response_width: int  # Tr

    @property
    def logits_to_keep(self) -> int:
        """Output positions the unpacked logits need: the prompt's last and every slot's."""
        return self.group * self.response_width + 1


def pack_groups(sequences: Tensor, attention_mask: Tensor, *, query_width: int, group: int) -> PackedGroups:
    """Pack rows (B, Tq + Tr) that come in consecutive groups of `group` sharing one prompt (the first Tq columns,
    left-padded alike within a group) into B / group rows, one per group (module docstring)."""
    rows, total = sequences.shape
    if rows % group:
        raise ValueError(f"pack_groups: {rows} rows do not split into groups of {group}")
    width = total - query_width
    groups = rows // group
    prompt_mask = attention_mask[::group, :query_width].bool()
    response_mask = attention_mask[:, query_width:].bool().reshape(groups, group * width)
    input_ids = torch.cat([sequences[::group, :query_width], sequences[:, query_width:].reshape(groups, -1)], dim=1)
    real = torch.cat([prompt_mask, response_mask], dim=1)  # (G, T)
    first = prompt_mask.sum(dim=1, keepdim=True)  # each response's first position: the prompt's real length
    slot_positions = (first + torch.arange(width, device=sequences.device)).repeat(1, group)
    positions = torch.cat([position_ids(prompt_mask), slot_positions], dim=1)
    # segment of each column: -1 for the prompt, else the slot's index
    segment = torch.cat([torch.full((query_width,), -1, device=sequences.device),
                         torch.arange(group, device=sequences.device).repeat_interleave(width)])
    column = torch.arange(segment.numel(), device=sequences.device)
    causal = column[None, :] <= column[:, None]  # [query, key]
    visible = causal & ((segment[None, :] == -1) | (segment[None, :] == segment[:, None]))
    mask = visible[None] & real[:, None, :]
    # A padding query sees itself, so that no row of the mask is empty (SDPA would return NaN for it).
    mask = mask | torch.eye(segment.numel(), dtype=torch.bool, device=sequences.device)[None]
    return PackedGroups(input_ids=input_ids, position_ids=positions, attention_mask=mask[:, None], group=group,
                        response_width=width)


def unpack_logits(logits: Tensor, packed: PackedGroups) -> Tensor:
    """(G, group x Tr + 1, V) logits of a packed pass's last `packed.logits_to_keep` positions -> (B, Tr, V), each
    row's logits that predict its response tokens: the prompt's last position predicts every slot's first token,
    a slot's position t its token t + 1."""
    groups, _, vocab = logits.shape
    group, width = packed.group, packed.response_width
    first = logits[:, :1].unsqueeze(1).expand(groups, group, 1, vocab)
    slots = logits[:, 1:].reshape(groups, group, width, vocab)[:, :, :-1]
    return torch.cat([first, slots], dim=2).reshape(groups * group, width, vocab)
