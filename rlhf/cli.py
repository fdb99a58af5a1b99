"""The `rlhf` command: one sub-command per stage, plus the registry.

    rlhf sft --pipeline pipelines/tiny.yaml [--force] [--restart] [--run TAG] [--nproc N] [sft.learning_rate=1e-4 ...]
    rlhf rm | ppo [--round R] ...;  rlhf dpo ...;  rlhf collect [--round R] [--labels FILE];  rlhf rounds --count N
    rlhf registry list [--json] [--pipeline NAME] [--stage sft]
    rlhf registry show ID
    rlhf registry gc [--yes]
    rlhf plan --pipeline pipelines/tiny.yaml [--round R] [--force] [--restart] [--json] [key=value ...]
    rlhf compare [--pipeline NAME] [--stage ppo] [--last N] [--perf] [--json | --csv]
    rlhf plot [--pipeline NAME] [--run TAG] [--round R]
    rlhf tasks [--tasks praise,palette,lists,chores] [--seeds 1,2,3] [--variants default,lora] [--home DIR] [k=v ...]

Errors meant for people (bad config, bad data, a missing parent) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rlhf.errors import RLHFError
from rlhf.pipeline import compare, launch, run_tags
from rlhf.pipeline.order import LATER_ROUNDS, ROUND_ONE, STAGES, TRAINED
from rlhf.pipeline.registry import Entry, Registry, RegistryError, default_root

EXIT_USER_ERROR = 2
EXIT_TARGETS_MISSED = 3  # `rlhf tasks` ran, and some task misses its targets


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.handler(args)
    except (RLHFError, RegistryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="Three-stage RLHF pipeline: sft, rm, ppo (or dpo).")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{sft,rm,ppo,dpo,collect,rounds,plan,registry,compare,plot,tasks}")
    helps = {"sft": "run the sft stage of a pipeline file", "rm": "train a reward model (round 1, or --round R)",
             "ppo": "run PPO (round 1, or --round R)",
             "dpo": "run DPO on the comparisons from the SFT policy, beside PPO (evaluated as PPO is)",
             "collect": "sample and label new comparisons on the current policy, for the next round",
             "rounds": "run collect -> rm -> ppo --count times, each a new round"}
    for command, text in helps.items():
        p = sub.add_parser(command, help=text)
        p.add_argument("--pipeline", default="pipelines/tiny.yaml", help="pipeline YAML file")
        p.add_argument("--force", action="store_true",
                       help="train even when a complete entry is up to date (an interrupted attempt still resumes)")
        p.add_argument("--restart", action="store_true",
                       help="start over: an interrupted attempt of the same inputs is marked failed, not resumed")
        p.add_argument("--run", default=os.environ.get(run_tags.ENV) or None, metavar="TAG",
                       help="pipeline run tag (wandb group <pipeline>-<TAG>); default: $RLHF_RUN, else the parent's")
        if command in ("rm", "ppo", "collect"):
            p.add_argument("--round", type=int, default=None, metavar="R",
                           help="round (rm, ppo: default 1; collect: default the newest PPO's round + 1)")
        if command == "collect":
            p.add_argument("--labels", metavar="FILE", help="your labels for the written pairs (labeller: file)")
        if command == "rounds":
            p.add_argument("--count", type=int, default=1, metavar="N", help="how many rounds to run")
        p.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="processes per machine under the pipeline's accelerate_config (NPROC=N; default: its "
                            "`processes`, else one per visible GPU)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override a field, e.g. sft.epochs=2")
        p.set_defaults(handler=_run_stage, stage=command)

    plan = sub.add_parser("plan", help="what the stages would do (up to date, resume, train), like make -n")
    plan.add_argument("--pipeline", default="pipelines/tiny.yaml", help="pipeline YAML file")
    plan.add_argument("--round", type=int, default=1, metavar="R", help="the round to plan (default 1: sft, rm, ppo)")
    plan.add_argument("--force", action="store_true", help="as the stages' --force")
    plan.add_argument("--restart", action="store_true", help="as the stages' --restart")
    plan.add_argument("--nproc", type=int, default=None, metavar="N",
                      help="plan for N processes per machine (default: as the stages would launch)")
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.add_argument("--verbose", action="store_true", help="how each part of the memory estimate is counted")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="override a field, e.g. sft.epochs=2")
    plan.set_defaults(handler=_plan)

    registry = sub.add_parser("registry", help="inspect the checkpoint registry")
    reg_sub = registry.add_subparsers(dest="registry_command", required=True)
    listing = reg_sub.add_parser("list", help="list entries (a table, or --json)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.add_argument("--pipeline", help="only this pipeline")
    listing.add_argument("--stage", choices=STAGES, help="only this stage")
    listing.add_argument("--status", choices=("running", "complete", "failed"), help="only this status")
    listing.set_defaults(handler=_registry_list)
    show = reg_sub.add_parser("show", help="print one entry as JSON")
    show.add_argument("id")
    show.set_defaults(handler=_registry_show)
    gc = reg_sub.add_parser("gc", help="list (and with --yes remove) folders of failed or abandoned attempts")
    gc.add_argument("--yes", action="store_true", help="remove them; without it, only list")
    gc.set_defaults(handler=_registry_gc)

    compare = sub.add_parser("compare", help="stage metrics side by side, one row per pipeline run")
    compare.add_argument("--pipeline", help="only this pipeline")
    compare.add_argument("--stage", choices=TRAINED, help="only runs that trained this stage, only its metrics")
    compare.add_argument("--last", type=int, metavar="N", help="only the newest N runs")
    compare.add_argument("--perf", action="store_true", help="speed and memory (tokens/s, MFU, peak memory) "
                         "instead of what was learned")
    output = compare.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON")
    output.add_argument("--csv", action="store_true", help="print CSV")
    compare.set_defaults(handler=_compare)

    plot = sub.add_parser("plot", help="write PNG curves of a pipeline run's stages into its folder")
    plot.add_argument("--pipeline", help="only runs of this pipeline")
    plot.add_argument("--run", metavar="TAG", help="the run tag (default: the newest run)")
    plot.add_argument("--round", type=int, metavar="R", help="the round (default: the run's newest)")
    plot.set_defaults(handler=_plot)

    tasks = sub.add_parser("tasks", help="the default pipeline on every gold task over seeds: one table against "
                                         "the targets (docs/tasks.md)")
    tasks.add_argument("--tasks", default="praise,palette,lists,chores", help="comma-separated gold tasks")
    tasks.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    tasks.add_argument("--variants", default="default,lora", help="comma-separated variants (default, lora)")
    tasks.add_argument("--home", default="runs/tasks", help="registry, data and summary (default %(default)s)")
    tasks.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run")
    tasks.set_defaults(handler=_tasks)
    return parser


def quiet_progress_bars() -> None:
    """Per-example progress bars from datasets and weight loading drown the training log."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _registry() -> Registry:
    return Registry(default_root())


def _run_stage(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlhf.pipeline import lineage
    from rlhf.pipeline.config import load_pipeline  # imported here so `rlhf registry` stays fast

    if args.run:  # the environment carries it into processes that accelerate launches
        os.environ[run_tags.ENV] = run_tags.check_tag(args.run, where="--run")
    pipeline, path = load_pipeline(args.pipeline, args.overrides)
    where = str(path) + (" (with overrides)" if args.overrides else "")
    if not launch.already_launched():  # the pre-flight, once, before any worker starts
        from rlhf.pipeline import preflight

        planned = preflight.run(pipeline, command=args.stage, where=where, nproc=args.nproc,
                                machine=preflight.this_machine())
        if planned is not None:
            return launch.relaunch(planned, args.argv)
    from rlhf.stages import collect, dpo, ppo, rm, sft  # torch, transformers, trl: after the pre-flight

    quiet_progress_bars()
    registry, common = _registry(), dict(where=where, force=args.force, restart=args.restart)
    if args.stage == "sft":
        sft.run(pipeline, registry=registry, **common)
    elif args.stage in ("rm", "ppo"):
        stage_round = _check_round(args.round)
        (rm.run if args.stage == "rm" else ppo.run)(pipeline, registry=registry, round=stage_round, **common)
    elif args.stage == "dpo":
        dpo.run(pipeline, registry=registry, **common)
    elif args.stage == "collect":
        collect.run(pipeline, registry=registry, round=None if args.round is None else _check_round(args.round),
                    labels_file=args.labels, **common)
    else:
        if args.count < 1:
            raise RLHFError(f"--count must be at least 1, not {args.count}")
        runs = {"collect": collect.run, "rm": rm.run, "ppo": ppo.run}
        for _ in range(args.count):
            number = lineage.next_round(registry, pipeline.name)
            print(f"rounds: round {number}")
            for stage in LATER_ROUNDS:
                if runs[stage](pipeline, registry=registry, round=number, **common) is None:
                    return 0  # collect wrote the pairs, which wait for your labels
    return 0


def _plan(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from rlhf.pipeline import preflight
    from rlhf.pipeline.config import load_pipeline
    from rlhf.stages import plan

    pipeline, path = load_pipeline(args.pipeline, args.overrides)
    where = str(path) + (" (with overrides)" if args.overrides else "")
    machine = preflight.this_machine()
    planned = preflight.plan_launch(pipeline, nproc=args.nproc, where=where, machine=machine)
    processes = planned.total if planned else 1
    quiet_progress_bars()
    registry = _registry()
    plans = plan.plan(pipeline, registry, where=where, round=_check_round(args.round), force=args.force,
                      restart=args.restart, processes=processes)
    memory = plan.memory(pipeline, registry, [p.stage for p in plans], processes=processes,
                         on_gpu=machine.gpus > 0 or preflight.needs_gpu(pipeline, stages=ROUND_ONE),
                         gpu_bytes=_gpu_bytes() if machine.gpus else None, verbose=args.verbose)
    if args.json:
        print(json.dumps({"stages": [asdict(p) for p in plans], "memory": memory.as_json()}, indent=2))
    else:
        print(plan.render(plans, header=f"plan: {path} (pipeline {pipeline.name}, round {args.round}, "
                                        f"{processes} process(es), {machine.describe()})"))
        print(memory.text)
    return 0


def _gpu_bytes() -> int:
    """Memory of the first visible GPU (they are alike on the boxes this plans for)."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def _check_round(value: int | None) -> int:
    if value is None:
        return 1
    if value < 1:
        raise RLHFError(f"--round must be at least 1, not {value}")
    return value


def _registry_list(args: argparse.Namespace) -> int:
    entries = _registry().entries(pipeline=args.pipeline, stage=args.stage, status=args.status)
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
    else:
        print(format_table(entries))
    return 0


def _registry_show(args: argparse.Namespace) -> int:
    print(json.dumps(_registry().get(args.id).to_dict(), indent=2))
    return 0


def _registry_gc(args: argparse.Namespace) -> int:
    registry = _registry()
    found = registry.garbage()
    if not found:
        print("nothing to remove: no failed, abandoned or unknown attempt folders")
        return 0
    for item in found:
        print(f"{item.entry_id or '-':30s}  {item.bytes / 2**20:8.1f} MiB  {item.reason}  {item.path}")
    total = sum(item.bytes for item in found) / 2**20
    if not args.yes:
        print(f"{len(found)} folder(s), {total:.1f} MiB; `rlhf registry gc --yes` removes them "
              "(a removed attempt can no longer be resumed)")
        return 0
    for item in found:
        registry.remove_garbage(item)
    print(f"removed {len(found)} folder(s), {total:.1f} MiB")
    return 0


def _compare(args: argparse.Namespace) -> int:
    if args.last is not None and args.last < 1:
        raise RLHFError(f"--last must be at least 1, not {args.last}")
    view = "perf" if args.perf else "learning"
    found = compare.pipeline_runs(_registry().entries(), pipeline=args.pipeline, stage=args.stage, last=args.last,
                                  view=view)
    stages = (args.stage,) if args.stage else TRAINED
    if args.json:
        print(compare.to_json(found))
    elif args.csv:
        print(compare.to_csv(found, stages=stages, view=view), end="")
    else:
        print(compare.to_table(found, stages=stages, view=view))
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rlhf.stages import matrix

    def items(text: str) -> list[str]:
        return [item.strip() for item in text.split(",") if item.strip()]

    try:
        seeds = [int(seed) for seed in items(args.seeds)]
    except ValueError:
        raise RLHFError(f"rlhf tasks --seeds: expected comma-separated integers, got {args.seeds!r}") from None
    summaries = matrix.run(tasks=items(args.tasks), seeds=seeds, variants=items(args.variants),
                           home=Path(args.home), extra=args.overrides)
    return 0 if all(s.meets for s in summaries) else EXIT_TARGETS_MISSED


def _plot(args: argparse.Namespace) -> int:
    from rlhf.pipeline import plot  # matplotlib is slow to import

    registry = _registry()
    found = compare.pipeline_runs(registry.entries(), pipeline=args.pipeline)
    if args.run:
        found = [r for r in found if r.run == args.run]
    if args.round:
        found = [r for r in found if r.round == args.round]
    if not found:
        which = (f"run {args.run!r}" if args.run else "complete stage entries") + (
            f" of round {args.round}" if args.round else "")
        raise RLHFError(f"no {which} in the registry at {registry.root}"
                        + (f" for pipeline {args.pipeline!r}" if args.pipeline else "") + "; see `rlhf compare`")
    print(plot.plot_run(registry, found[-1]))
    return 0


TABLE_METRICS = ("eval/loss", "eval/accuracy", "eval/score", "eval/gold")


def format_table(entries: list[Entry]) -> str:
    """A readable table: one row per entry, with its headline metric."""
    if not entries:
        return "(no registry entries)"
    header = ("id", "stage", "pipeline", "status", "parents", "created_at", "metrics", "path")
    rows = [header]
    for e in entries:
        shown = ", ".join(f"{k}={e.metrics[k]:.4g}" for k in TABLE_METRICS
                          if isinstance(e.metrics.get(k), (int, float)))
        rows.append((e.id, e.stage, e.pipeline, e.status, ",".join(e.parents) or "-", e.created_at,
                     shown or "-", e.path))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


if __name__ == "__main__":
    sys.exit(main())
