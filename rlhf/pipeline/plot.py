"""PNG curves of a pipeline run's stages, drawn from each entry's history.jsonl (no wandb needed).

    rlhf plot [--pipeline tiny] [--run TAG] [--round R]     (make plot; the newest run by default)

Writes `<registry root>/<pipeline>/run-<tag>/stages.png` (`run-<tag>/round-<R>/` from round 2): SFT
train and eval loss, RM loss and accuracy, PPO reward-model score, KL and gold score over steps, with the
final evaluation of the PPO and SFT policies as dashed lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import RLHFError
from rlhf.pipeline import history
from rlhf.pipeline.compare import PipelineRun
from rlhf.pipeline.order import ROUND_ONE
from rlhf.pipeline.registry import Registry

FILE = "stages.png"


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]  # history keys drawn as lines, against the step
    baselines: tuple[tuple[str, str], ...] = ()  # (label, final metric key) drawn as dashed horizontal lines


PANELS: dict[str, tuple[Panel, ...]] = {
    "sft": (Panel("SFT loss", ("train/loss", "eval/loss")),),
    "rm": (Panel("RM loss", ("train/loss", "eval/loss")),
           Panel("RM accuracy", ("train/accuracy", "eval/accuracy"))),
    "ppo": (Panel("PPO reward-model score", ("objective/score",), (("eval: PPO", "eval/score"),
                                                                   ("eval: SFT", "eval/sft_score"))),
            Panel("PPO KL to the SFT policy", ("objective/kl",)),
            Panel("PPO gold score", ("objective/gold",), (("eval: PPO", "eval/gold"), ("eval: SFT", "eval/sft_gold")))),
}


def run_folder(registry: Registry, run: PipelineRun) -> Path:
    return registry.root / run.pipeline / f"run-{run.run}" / ("" if run.round == 1 else f"round-{run.round}")


def plot_run(registry: Registry, run: PipelineRun) -> Path:
    """Draw every stage the run has (its own or reused) and return the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    stages = [s for s in ROUND_ONE if s in run.stages]
    rows = [(stage, panel) for stage in stages for panel in PANELS[stage]]
    if not rows:
        raise RLHFError(f"pipeline run {run.run} has no stage to plot")
    cols = 3
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.4 * nrows), squeeze=False)
    for ax, (stage, panel) in zip(axes.flat, rows):
        result = run.stages[stage]
        entry = registry.get(result.id)
        lines = history.read(entry.path)
        for key in panel.keys:
            points = [(row["step"], row[key]) for row in lines if isinstance(row.get(key), (int, float))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 12 else None, markersize=3, label=key)
        for label, key in panel.baselines:
            value = entry.metrics.get(key)
            if isinstance(value, (int, float)):
                ax.axhline(value, linestyle="--", linewidth=1, color="grey" if "SFT" in label else "black",
                           label=f"{label} {value:.3g}")
        suffix = " (reused)" if result.reused else ""
        ax.set_title(f"{panel.title}{suffix}\n{result.id}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no history", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(f"{run.pipeline} run {run.run}" + (f", round {run.round}" if run.round > 1 else ""))
    fig.tight_layout()
    folder = run_folder(registry, run)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
