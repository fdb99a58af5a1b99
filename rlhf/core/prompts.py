"""Prompts for PPO: tokenised once, length-checked, served in shuffled passes that a resume can rejoin."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.errors import DataError


@dataclass(frozen=True)
class PromptSet:
    ids: list[list[int]]  # token ids per prompt (no padding)
    texts: list[str]  # the prompt as text (chat template applied), for the reward model and sample tables
    truncated: int  # prompts cut to max_prompt_length
    skipped: int  # prompts dropped for being too long


def render_prompt(prompt: str | list, tokenizer) -> str:
    """A prompt as the text a response follows: a message list rendered with the chat template and a generation
    prompt, a text as it is."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def tokenize_prompts(rows: list[dict], tokenizer, *, max_length: int, long_prompts: str, origin: str) -> PromptSet:
    """Token ids of each prompt; a message list is rendered with the chat template and a generation prompt.
    Prompts past `max_length` keep their end (the question) or are skipped, and are counted."""
    ids, texts, truncated, skipped = [], [], 0, 0
    for row in rows:
        prompt = render_prompt(row["prompt"], tokenizer)
        tokens = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if len(tokens) > max_length:
            if long_prompts == "skip":
                skipped += 1
                continue
            tokens = tokens[-max_length:]
            prompt = tokenizer.decode(tokens)
            truncated += 1
        if not tokens:
            raise DataError(f"{origin}: a prompt tokenises to nothing: {row['prompt']!r}")
        ids.append(tokens)
        texts.append(prompt)
    if not ids:
        raise DataError(f"{origin}: no prompts left (all {skipped} are longer than max_prompt_length "
                        f"{max_length}); raise ppo.max_prompt_length or use long_prompts: truncate")
    return PromptSet(ids=ids, texts=texts, truncated=truncated, skipped=skipped)


def left_pad(batch: list[list[int]], *, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """(ids, mask), both (B, T), padded on the left so every prompt ends at the last column."""
    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


class PromptStream:
    """Endless shuffled passes over prompt indices; `position` (consumed count) is all a resume needs.

    Each process draws its own disjoint share of every batch (`rank` of `processes`).
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, processes: int = 1):
        self.size, self.seed, self.rank, self.processes = size, seed, rank, processes
        self.position = 0
        self._cache: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        if self._cache[0] != epoch:
            order = list(range(self.size))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._cache = (epoch, order)
        return self._cache[1]

    def next_batch(self, batch_size: int) -> list[int]:
        """This process's `batch_size` indices of the next global batch (batch_size x processes prompts)."""
        wanted = batch_size * self.processes
        picked = []
        while len(picked) < wanted:
            epoch, offset = divmod(self.position, self.size)
            take = min(wanted - len(picked), self.size - offset)
            picked.extend(self._order(epoch)[offset:offset + take])
            self.position += take
        return picked[self.rank * batch_size:(self.rank + 1) * batch_size]
