"""Metric history beside a checkpoint: `history.jsonl`, one JSON object per logged step.

    history.append(folder, step=10, metrics={"train/loss": 1.2})
    history.read(folder)                   # [{"step": 10, "train/loss": 1.2}, ...]

Names are the ones wandb shows: the trainers' `loss` becomes `train/loss` and `eval_loss` becomes
`eval/loss` (as transformers' wandb callback renames them), PPO's are already prefixed. A resumed
attempt first drops the lines logged after its checkpoint, so every step appears once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

FILE = "history.jsonl"


def path_of(folder: Path | str) -> Path:
    return Path(folder) / FILE


def wandb_names(logs: dict) -> dict:
    """A trainer's log dict under the names wandb shows (`eval_x` -> `eval/x`, `x` -> `train/x`)."""
    out = {}
    for key, value in logs.items():
        if key.startswith("eval_"):  # TRL's `eval_rewards/accuracies` too
            out["eval/" + key[len("eval_"):]] = value
        elif "/" in key:
            out[key] = value
        else:
            out["train/" + key] = value
    return out


def append(folder: Path | str, *, step: int, metrics: dict) -> None:
    """Add one line; non-finite floats are written as null so that the file stays valid JSON."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()
             if isinstance(v, (int, float, str, bool)) or v is None}
    with open(path_of(folder), "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **clean}) + "\n")


def read(folder: Path | str) -> list[dict]:
    """Every line of the history, oldest first; [] when there is none. A torn last line is skipped."""
    path = path_of(folder)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill; the resumed attempt writes that step again
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def truncate_after(folder: Path | str, *, step: int) -> None:
    """Keep only the lines up to `step` (a resumed attempt logs the later steps again)."""
    path = path_of(folder)
    if not path.is_file():
        return
    kept = [row for row in read(folder) if row["step"] <= step]
    path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
