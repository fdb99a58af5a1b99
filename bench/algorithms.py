"""`make algorithms`: PPO, GRPO, RLOO, REINFORCE++ and DPO side by side, from the same SFT policy and reward model
per seed, at equal episodes and at equal wall time; medians over seeds, one table, and the curves.

    make algorithms [ALGOS_ARGS="--seeds 1,2,3 --threads 1"]
    .venv/bin/python bench/algorithms.py --pipeline pipelines/tiny.yaml --seeds 1,2,3 [--methods ppo,grpo,dpo]

Per seed: the pipeline's SFT and RM stages (pipeline `algos-s<seed>`, reused when up to date), then each method in
a process of its own (so that each peak memory is its own) under a pipeline name of its own, `algos-s<seed>-<method>`,
with the SFT and RM entries as parents by id. Equal episodes: the pipeline's `ppo.episodes` for every online
method. Equal wall time: each critic-free method again, with the episodes it trains in PPO's median training seconds
(DPO's one pass over the pairs is not a budget that scales, so it has one row). Everything lives in --home (default
runs/algorithms): the registry, summary.md, summary.json and curves.png. The figures are
rlhf/pipeline/side_by_side.py's; the methods and their settings are in its METHODS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from rlhf.pipeline import history, lineage  # noqa: E402
from rlhf.pipeline.config import load_pipeline  # noqa: E402
from rlhf.pipeline.order import BESIDE  # noqa: E402
from rlhf.pipeline.registry import Entry, Registry  # noqa: E402
from rlhf.pipeline.side_by_side import (  # noqa: E402
    METHODS,
    ONLINE,
    MethodRun,
    equal_time_episodes,
    summarise,
    table,
)


def stage(command: list[str], *, env: dict, what: str, force: bool = False) -> None:
    """One `rlhf` stage in its own process (an up-to-date entry is reused unless `force`); its output is shown
    only when it fails."""
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", *command, *(["--force"] if force else [])], cwd=REPO,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"algorithms: {what} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")


def parents(pipeline_file: Path, seed: int, *, env: dict, registry: Registry, sets: list[str]) -> tuple[str, str]:
    """The seed's SFT and RM entries: trained (or found up to date) under pipeline `algos-s<seed>`."""
    name = f"algos-s{seed}"
    for which in BESIDE["dpo"]:  # the stages every method starts from (DPO's parents are PPO's too)
        stage([which, "--pipeline", str(pipeline_file), f"name={name}", f"seed={seed}", *sets], env=env,
              what=f"{which} (seed {seed})")
    return (lineage.newest(registry, stage="sft", pipeline=name).id,
            lineage.newest(registry, stage="rm", pipeline=name).id)


def run_method(pipeline_file: Path, method: str, seed: int, *, episodes: int | None, sft_id: str, rm_id: str,
               env: dict, registry: Registry, sets: list[str], force: bool = False) -> Entry:
    """One method on one seed, trained or found up to date; its registry entry."""
    if method == "dpo":
        name = f"algos-s{seed}-dpo"
        args = ["dpo", f"dpo.sft_parent={sft_id}", f"dpo.rm_parent={rm_id}"]
    else:
        name = f"algos-s{seed}-{method}-e{episodes}"
        args = ["ppo", f"ppo.sft_parent={sft_id}", f"ppo.rm_parent={rm_id}", f"ppo.episodes={episodes}",
                *METHODS[method]]
    command = [args[0], "--pipeline", str(pipeline_file), f"name={name}", f"seed={seed}", *args[1:], *sets]
    print(f"algorithms: {method}, seed {seed}" + (f", {episodes} episodes" if episodes else ""), flush=True)
    stage(command, env=env, what=f"{method} (seed {seed})", force=force)
    return lineage.newest(registry, stage=args[0], pipeline=name)


def figures(method: str, seed: int, entry: Entry) -> MethodRun:
    m = entry.metrics
    missing = [k for k in ("eval/gold", "eval/sft_gold", "eval/kl", "train/seconds") if m.get(k) is None]
    if missing:
        raise SystemExit(f"algorithms: {entry.id} ({method}, seed {seed}) lacks {', '.join(missing)}: the "
                         f"comparison needs held-out prompts and a gold task (ppo.gold)")
    return MethodRun(method=method, seed=seed, episodes=m.get("train/episodes") if method != "dpo" else None,
                     gold=m["eval/gold"], sft_gold=m["eval/sft_gold"], kl=m["eval/kl"], seconds=m["train/seconds"],
                     episodes_per_s=m.get("train/episodes_per_s"), peak_memory_mb=m.get("train/peak_memory_mb"))


def draw(curves: dict[str, list[list[dict]]], path: Path) -> None:
    """Rollout gold score and KL of every online method against episodes and against training seconds, one line
    per seed run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False)
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for method, runs in curves.items():
        for i, rows in enumerate(runs):
            episodes = [r.get("charts/episodes") for r in rows]
            seconds, total = [], 0.0
            for r in rows:
                total += r.get("perf/step_seconds") or 0.0
                seconds.append(total)
            for row, key, title in ((0, "objective/gold", "rollout gold score"), (1, "objective/kl", "KL to SFT")):
                ys = [r.get(key) for r in rows]
                for col, xs, xlabel in ((0, episodes, "episodes"), (1, seconds, "training seconds")):
                    points = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
                    if not points:
                        continue
                    ax = axes[row][col]
                    ax.plot(*zip(*points), color=colours[method], alpha=0.8, label=method if i == 0 else None)
                    ax.set_xlabel(xlabel)
                    ax.set_title(title)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=str(REPO / "pipelines" / "tiny.yaml"))
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    parser.add_argument("--episodes", type=int, help="episodes of every online method (default: ppo.episodes)")
    parser.add_argument("--no-equal-time", action="store_true", help="skip the equal-wall-time runs")
    parser.add_argument("--home", default=str(REPO / "runs" / "algorithms"), help="registry and results")
    parser.add_argument("--sft", help="an SFT entry id in --home to start every seed from (skips SFT and RM)")
    parser.add_argument("--rm", help="with --sft: the reward model entry id")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--force", action="store_true",
                        help="train every method again (to measure speed anew); SFT and RM are still reused")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a pipeline override for every stage and method (repeatable)")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    if bool(args.sft) != bool(args.rm):
        parser.error("--sft and --rm go together")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    pipeline_file = Path(args.pipeline).resolve()
    pipeline, _ = load_pipeline(pipeline_file, args.set)
    episodes = args.episodes or pipeline.ppo.episodes
    home = Path(args.home).resolve()
    env = {**os.environ, "RLHF_HOME": str(home), "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
           "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    registry = Registry(home)

    runs: list[MethodRun] = []
    curves: dict[str, list[list[dict]]] = {m: [] for m in methods if m in ONLINE}
    chosen: dict[int, tuple[str, str]] = {}
    for seed in seeds:
        chosen[seed] = (args.sft, args.rm) if args.sft else parents(pipeline_file, seed, env=env,
                                                                      registry=registry, sets=args.set)
        for method in methods:
            entry = run_method(pipeline_file, method, seed, episodes=None if method == "dpo" else episodes,
                               sft_id=chosen[seed][0], rm_id=chosen[seed][1], env=env, registry=registry,
                               sets=args.set, force=args.force)
            runs.append(figures(method, seed, entry))
            if method in curves:
                curves[method].append(history.read(Path(entry.path)))
    sections = [f"Equal episodes ({episodes} for each online method):\n\n" + table(summarise(runs))]

    summaries = {s.method: s for s in summarise(runs)}
    if not args.no_equal_time and "ppo" in summaries and any(m in methods for m in ONLINE if m != "ppo"):
        budget = summaries["ppo"].seconds
        step = pipeline.ppo.rollout_batch_size
        timed = []
        for method in (m for m in methods if m in ONLINE and m != "ppo"):
            rate = summaries[method].episodes_per_s
            budget_episodes = equal_time_episodes(budget, rate, multiple=step, at_least=step)
            for seed in seeds:
                entry = run_method(pipeline_file, method, seed, episodes=budget_episodes, sft_id=chosen[seed][0],
                                   rm_id=chosen[seed][1], env=env, registry=registry, sets=args.set,
                                   force=args.force)
                timed.append(figures(method, seed, entry))
        ppo_rows = [r for r in runs if r.method == "ppo"]
        sections.append(f"Equal wall time (PPO's median {budget:.1f} s of training; each critic-free method given "
                        f"the episodes it trains in that time at its own rate):\n\n"
                        + table(summarise(ppo_rows + timed)))
        runs += timed

    text = "\n\n".join(sections)
    home.mkdir(parents=True, exist_ok=True)
    (home / "summary.md").write_text(text + "\n", encoding="utf-8")
    document = {"seeds": seeds, "episodes": episodes, "threads": args.threads,
                "runs": [dataclasses.asdict(r) for r in runs]}
    (home / "summary.json").write_text(json.dumps(document, indent=1), encoding="utf-8")
    if curves:
        draw(curves, home / "curves.png")
    print(text)
    print(f"algorithms: {home / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
