"""The `rlhf` command: one sub-command per stage, plus the registry.

    rlhf sft --pipeline pipelines/tiny.yaml [--force] [sft.learning_rate=1e-4 ...]
    rlhf registry list [--json] [--pipeline NAME] [--stage sft]
    rlhf registry show ID

Errors meant for people (bad config, bad data, a missing parent) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rlhf import launch
from rlhf.errors import RLHFError
from rlhf.registry import STAGES, Entry, Registry, RegistryError, default_root

EXIT_USER_ERROR = 2


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
    parser = argparse.ArgumentParser(prog="rlhf", description="Three-stage RLHF pipeline: sft, rm, ppo.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{sft,rm,ppo,registry}")
    for stage in ("sft", "rm", "ppo"):
        p = sub.add_parser(stage, help=f"run the {stage} stage of a pipeline file")
        p.add_argument("--pipeline", default="pipelines/tiny.yaml", help="pipeline YAML file")
        p.add_argument("--force", action="store_true", help="retrain even when an entry is up to date")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override a field, e.g. sft.epochs=2")
        p.set_defaults(handler=_run_stage, stage=stage)

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
    from rlhf.config import load_pipeline  # imported here so `rlhf registry` stays fast
    from rlhf.stages import ppo, rm, sft

    pipeline, path = load_pipeline(args.pipeline, args.overrides)
    where = str(path) + (" (with overrides)" if args.overrides else "")
    if pipeline.accelerate_config and not launch.already_launched():
        return launch.relaunch(pipeline.accelerate_config, args.argv)
    quiet_progress_bars()
    stages = {"sft": sft.run, "rm": rm.run, "ppo": ppo.run}
    stages[args.stage](pipeline, registry=_registry(), where=where, force=args.force)
    return 0


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


TABLE_METRICS = ("eval_loss", "eval_accuracy", "eval/score", "eval/gold")


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
