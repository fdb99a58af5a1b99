"""What the reward-model stage keeps and says once it has trained: the checkpoint with the best held-out accuracy
(or loss, `rm.best_metric`), found by transformers' `load_best_model_at_end`, where held-out accuracy peaked, and
the verdict on the kept model (rlhf/pipeline/rm_verdict.py), printed, with what to try when it is weak, and recorded
in the registry entry.

transformers keeps the best checkpoint when its evaluations and saves fall on the same steps, spares it from
`save_total_limit`, names it in the trainer state a resumed attempt reads back, and loads it (full weights, a LoRA
adapter, a DeepSpeed or FSDP checkpoint) when training ends; so no hand-written copy of the best weights is needed.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer, TrainerCallback

from rlhf.pipeline.config import RMStage
from rlhf.pipeline.registry import Registry
from rlhf.pipeline.rm_verdict import EvalPoint, KeptBy, Verdict, eval_points, judge, keep_line
from rlhf.stages.runner import Attempt
from rlhf.training import dist


def keep_args(cfg: RMStage, *, kept_by: KeptBy) -> dict:
    """TrainingArguments that keep the best checkpoint: evaluate at every save (and at the end) and load the best
    one when training ends (transformers' load_best_model_at_end, which also spares that checkpoint from
    save_total_limit, so a resumed attempt still knows it). Nothing for `last`."""
    if kept_by == "last":
        return {}
    return dict(eval_strategy="steps", eval_steps=cfg.save_steps, load_best_model_at_end=True,
                metric_for_best_model=kept_by, greater_is_better=kept_by == "accuracy")


class EvalCurve(TrainerCallback):
    """The held-out evaluations made while training, this attempt's and (from the resumed checkpoint's
    trainer state) the earlier attempts'; read when training ends, before the final evaluation adds its own."""

    def __init__(self):
        self.points: list[EvalPoint] = []

    def on_train_end(self, args, state, control, **kwargs):
        self.points = eval_points(state.log_history)


def kept_step(trainer: Trainer, *, kept_by: KeptBy) -> int:
    """The optimiser step of the weights the trainer ended with: the best checkpoint's, or the last step."""
    best = trainer.state.best_model_checkpoint
    if kept_by == "last" or best is None:
        return trainer.state.global_step
    return int(Path(best).name.split("-")[-1])


def report(cfg: RMStage, metrics: dict, points: list[EvalPoint], *, kept_by: KeptBy, attempt: Attempt,
           registry: Registry) -> Verdict:
    """Say which checkpoint was kept and judge it; a weak model is a warning with what to try. The verdict goes
    into the entry's info (`verdict`)."""
    verdict = judge(accuracy=metrics["eval/accuracy"], init_accuracy=metrics["eval/init_accuracy"],
                    warn_accuracy=cfg.warn_accuracy, warn_gain=cfg.warn_gain)
    if not dist.is_main():
        return verdict
    kept = keep_line(points, kept_by=kept_by, kept_step=metrics["eval/kept_step"],
                     total_steps=metrics["train/global_step"])
    if kept:
        print(f"rm: {kept}")
    if verdict.status == "ok":
        print(f"rm: {verdict.line()}")
    else:
        print(f"rm: warning: {verdict.line()}\nrm: what to try:" + "".join(f"\n  - {a}" for a in verdict.advice))
    entry = registry.get(attempt.entry.id)
    registry.update(entry.id, info={**entry.info, "verdict": verdict.as_info()})
    return verdict
