"""Trainer checkpoints inside an entry's folder: which one a resumed attempt continues from."""

from __future__ import annotations

from pathlib import Path

STATE_FILE = "trainer_state.json"  # written last, by TRL's trainers and by our PPO checkpoint alike


def last_checkpoint(folder: Path) -> Path | None:
    """The newest trainer checkpoint that was fully written (its trainer_state.json is written last)."""
    if not folder.is_dir():
        return None
    complete = [p for p in folder.glob("checkpoint-*")
                if p.name.split("-")[-1].isdigit() and (p / STATE_FILE).is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)
