"""How good a trained reward model is, in words: which of its held-out evaluations the rm stage keeps, and whether
its held-out accuracy is enough to optimise a policy against (a verdict, with what to try when it is not).

Numbers in, strings out, no torch: the rm stage prints and records the verdict (`info.verdict`, `eval/verdict`),
PPO prints it again before it starts and refuses a model below `ppo.min_rm_accuracy`, and `rlhf plan` shows that
refusal without loading anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from rlhf.errors import ConfigError
from rlhf.pipeline.config import RMStage
from rlhf.pipeline.order import make_target
from rlhf.pipeline.registry import Entry

KeptBy = Literal["accuracy", "loss", "last"]


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation of the held-out pairs during training."""

    step: int  # optimiser step
    accuracy: float  # share of pairs whose chosen response scored higher
    loss: float  # mean Bradley-Terry loss, -logsigmoid(r_chosen - r_rejected)


def eval_points(log_history: list[dict]) -> list[EvalPoint]:
    """The evaluations in a trainer's `state.log_history` after step 0 (the starting model), in step order; of two
    logs at one step the later wins."""
    by_step = {}
    for log in log_history:
        if "eval_accuracy" in log and "eval_loss" in log and log.get("step", 0) > 0:
            by_step[int(log["step"])] = EvalPoint(step=int(log["step"]), accuracy=float(log["eval_accuracy"]),
                                                  loss=float(log["eval_loss"]))
    return [by_step[step] for step in sorted(by_step)]


def best_point(points: list[EvalPoint], *, metric: Literal["accuracy", "loss"]) -> EvalPoint | None:
    """The first evaluation with the highest accuracy (or lowest loss): a later tie does not replace it, as in
    transformers' `load_best_model_at_end`."""
    best = None
    for point in points:
        if best is None or (point.accuracy > best.accuracy if metric == "accuracy" else point.loss < best.loss):
            best = point
    return best


def keep_line(points: list[EvalPoint], *, kept_by: KeptBy, kept_step: int, total_steps: int) -> str | None:
    """One sentence on where held-out accuracy peaked and which checkpoint the stage keeps; None without
    evaluations during training."""
    peak = best_point(points, metric="accuracy")
    if peak is None:
        return None
    last = points[-1]
    where = f"peaked at {peak.accuracy:.3f} at step {peak.step} of {total_steps}"
    if kept_by == "last":
        ended = f" and ended at {last.accuracy:.3f}" if peak.step != last.step else " (the end)"
        return f"held-out accuracy {where}{ended}; keeping the last checkpoint (rm.best_metric: last)"
    kept = next((p for p in points if p.step == kept_step), None)
    if kept is None:  # the trainer kept a step that was not evaluated: say what it kept, nothing more
        return f"held-out accuracy {where}; keeping the checkpoint of step {kept_step}"
    if kept_by == "loss":
        return (f"held-out loss was lowest ({kept.loss:.4f}, accuracy {kept.accuracy:.3f}) at step {kept.step} of "
                f"{total_steps}; accuracy {where}; keeping the checkpoint of step {kept.step} (rm.best_metric: loss)")
    if kept.step == last.step:
        return f"held-out accuracy {where}, the last evaluation; keeping the last checkpoint"
    if last.accuracy >= kept.accuracy:  # a tie: the first of the best is kept
        return (f"held-out accuracy reached {kept.accuracy:.3f} at step {kept.step} of {total_steps} and rose no "
                f"higher; keeping that checkpoint (rm.best_metric: accuracy)")
    return (f"held-out accuracy {where} ({last.accuracy:.3f} at the end); keeping that checkpoint "
            f"(rm.best_metric: accuracy)")


# What to try, most likely first. FLAT: accuracy hardly moved from the starting model's; LOW: it moved, not enough.
FLAT_ADVICE = (
    "if the training loss hardly fell, train longer or at a higher learning rate (rm.epochs or rm.max_steps, "
    "rm.learning_rate)",
    "if the training loss fell but held-out accuracy did not, the model memorised its pairs: more data, "
    "fewer epochs, a lower learning rate, or hold its hidden states to a language model's (rm.lm_loss_coef 0.3)",
    "check the labels: chosen and rejected swapped, or assigned at random, leave nothing to learn",
)
LOW_ADVICE = (
    "train longer at a lower learning rate (more rm.epochs, a smaller rm.learning_rate)",
    "add comparison data (rm.dataset, rm.max_train_samples)",
    "check the labels for noise: pairs whose chosen answer is not better cap the accuracy any model reaches",
    "start from a stronger backbone (rm.init)",
    "if it ranks its training pairs far better than held-out ones, regularise it: rm.lm_loss_coef 0.3",
)


@dataclass(frozen=True)
class Verdict:
    """Whether a reward model's held-out accuracy is enough, against the thresholds it was judged by."""

    status: Literal["ok", "weak"]
    accuracy: float  # held-out accuracy of the kept checkpoint
    init_accuracy: float | None  # the starting model's (step 0); None when not measured
    warn_accuracy: float  # rm.warn_accuracy it was judged by
    warn_gain: float  # rm.warn_gain it was judged by
    problems: tuple[str, ...]  # each names the figure and the setting it fell short of
    advice: tuple[str, ...]  # what to try, most likely first

    def line(self) -> str:
        """`held-out accuracy 0.620 (0.510 before training): weak: below rm.warn_accuracy 0.7`"""
        before = f" ({self.init_accuracy:.3f} before training)" if self.init_accuracy is not None else ""
        return f"held-out accuracy {self.accuracy:.3f}{before}: " + (
            "ok" if self.status == "ok" else "weak: " + "; ".join(self.problems))

    def as_info(self) -> dict:
        """For the registry entry's `info.verdict` (JSON)."""
        return {**asdict(self), "problems": list(self.problems), "advice": list(self.advice)}

    @classmethod
    def from_info(cls, info: dict) -> Verdict:
        return cls(**{**info, "problems": tuple(info["problems"]), "advice": tuple(info["advice"])})


def judge(*, accuracy: float, init_accuracy: float | None, warn_accuracy: float, warn_gain: float) -> Verdict:
    """`weak` when held-out accuracy is below `warn_accuracy`, or rose less than `warn_gain` above the starting
    model's; otherwise `ok`."""
    problems, advice = [], []
    if init_accuracy is not None and accuracy - init_accuracy < warn_gain:
        problems.append(f"{accuracy - init_accuracy:+.3f} over the starting model, less than rm.warn_gain {warn_gain}")
        advice += FLAT_ADVICE
    if accuracy < warn_accuracy:
        problems.append(f"below rm.warn_accuracy {warn_accuracy}")
        advice += [a for a in LOW_ADVICE if a not in advice]
    return Verdict(status="weak" if problems else "ok", accuracy=accuracy, init_accuracy=init_accuracy,
                   warn_accuracy=warn_accuracy, warn_gain=warn_gain, problems=tuple(problems), advice=tuple(advice))


def of_entry(entry: Entry) -> Verdict | None:
    """The verdict recorded in a reward model's registry entry; for an entry made before verdicts were recorded,
    judged from its metrics with the default thresholds; None when it has no held-out accuracy."""
    if "verdict" in entry.info:
        return Verdict.from_info(entry.info["verdict"])
    accuracy = entry.metrics.get("eval/accuracy")
    if accuracy is None:
        return None
    return judge(accuracy=accuracy, init_accuracy=entry.metrics.get("eval/init_accuracy"),
                 warn_accuracy=RMStage.warn_accuracy, warn_gain=RMStage.warn_gain)


def require_accuracy(entry: Entry, *, minimum: float | None, setting: str, where: str) -> None:
    """Refuse (ConfigError) a reward model whose held-out accuracy is below `minimum` (the setting named
    `setting`); None accepts any."""
    if minimum is None:
        return
    other, command = f"{setting.split('.')[0]}.rm_parent", make_target("rm", entry.round)
    accuracy = entry.metrics.get("eval/accuracy")
    if accuracy is None:
        raise ConfigError(f"{where}: {setting} is {minimum} but reward model {entry.id} ({entry.path}) records no "
                          f"held-out accuracy (eval/accuracy); name an rm entry with {other}, or unset {setting}")
    if accuracy < minimum:
        raise ConfigError(f"{where}: reward model {entry.id} ({entry.path}) ranks {accuracy:.3f} of its held-out "
                          f"pairs right, below {setting} {minimum}; train a better one (`{command}`, "
                          f"and see the advice it printed), name another with {other}, or lower {setting}")
