"""The GPU check: GPU tests, then the benchmark pipeline's stages, then one summary of speed per stage and phase.

    make gpu-check                     on a GPU box (no network needed: `make gpu-wheels` first, on a machine with it)
    make gpu-check DEVICE=cpu          the same end to end on the CPU at a small shape, in about a minute
    python3 scripts/gpu_check.py --device cuda --out DIR --home DIR [--shape qwen2.5-7b] [--budget-s 450]

In run order: 1. install the carried wheels (.gpu-wheels/, offline) when trl or datasets is missing  2. the tests
marked `gpu`  3. generate the data (rlhf.tasks.digest)  4. sft, rm and ppo of pipelines/gpu-bench.yaml through the
`rlhf` CLI, short (overrides), in a scratch registry (--home)  5. `rlhf plan`, if this version has it  6. summary.json
and summary.md in --out, every step's output in gpu-check.log beside them (three files: few enough to come back
from the device tool). The last line printed is the path of summary.json.

On cuda the model has the pipeline's shape (Qwen2.5-0.5B's, or --shape); on cpu a two-layer one. Every step gets
what is left of --budget-s; a step that runs out is stopped and the summary says so.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIPELINE = "pipelines/gpu-bench.yaml"
RUN = "gpu-check"

# Short stages. cuda: the pipeline's sizes (512-token prompts, 53-token responses, 64 prompts a step).
CUDA_STAGES = ("sft.max_steps=30", "rm.max_steps=30", "ppo.episodes=512")
CUDA_DATA = ()  # the digest task's defaults: ~520-token prompts, 512 records a file
# cpu: a two-layer Qwen2-style model, ~130-token prompts, a few steps of each stage.
CPU_DATA = ("--prompt-words", "100", "--demos", "64", "--comparisons", "64", "--prompts", "64", "--eval-prompts", "16")
CPU_MODEL = ("tiny.shape=null", "tiny.architecture=qwen2", "tiny.hidden_size=32", "tiny.intermediate_size=64",
             "tiny.num_hidden_layers=2", "tiny.num_attention_heads=2", "tiny.num_key_value_heads=1",
             "tiny.model_vocab_size=2048", "tiny.rope_theta=1e6")
CPU_STAGES = ("sft.max_steps=4", "sft.batch_size=8", "sft.logging_steps=2", "sft.max_length=256",
              "rm.max_steps=4", "rm.batch_size=8", "rm.logging_steps=2", "rm.max_length=256",
              "ppo.episodes=32", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.micro_batch_size=8",
              "ppo.ppo_epochs=1", "ppo.max_prompt_length=192", "ppo.max_new_tokens=8", "ppo.min_new_tokens=8",
              "ppo.max_eval_prompts=16", "ppo.eval_batch_size=16",
              # compiling on 2 CPU cores would take minutes (tests/test_sft.py and test_ppo.py check it works)
              "sft.compile=false", "rm.compile=false", "ppo.compile=false", "ppo.generation_cache=dynamic")
LOG = "gpu-check.log"  # every step's output, in run order
PHASES = ("generate", "score", "update", "other")  # perf/<phase>_seconds of each PPO step (rlhf/training/ppo)
TARGETS = {"sft_mfu": 0.35, "rm_mfu": 0.35, "ppo_update_mfu": 0.30, "ppo_generate_share_max": 0.50}  # issue 15, H200


class Budget:
    """Seconds left of the whole check."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(self.end - time.monotonic(), 1.0)


def run_step(name: str, command: list[str], *, env: dict, out: Path, budget: Budget) -> dict:
    """Run one command, its output echoed and appended to out/gpu-check.log, stopped when the budget runs out."""
    print(f"gpu-check: {name}: {' '.join(command)}", flush=True)
    began = time.monotonic()
    lines = []
    with open(out / LOG, "a", encoding="utf-8") as log:
        log.write(f"==== {name}: {' '.join(command)}\n")
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        stopper = threading.Timer(budget.left(), process.kill)  # ends the output below too
        stopper.start()
        for line in process.stdout:
            log.write(line)
            lines.append(line)
            print(f"  {line}", end="", flush=True)
        rc = process.wait()
        stopper.cancel()
    if rc < 0 and budget.left() <= 1.0:
        rc = "timed out"
    seconds = time.monotonic() - began
    print(f"gpu-check: {name}: {'ok' if rc == 0 else rc} in {seconds:.0f} s", flush=True)
    result = {"status": "ok" if rc == 0 else "timed out" if rc == "timed out" else f"failed (exit {rc})",
              "seconds": round(seconds, 1)}
    return {**result, "output_tail": "".join(lines[-40:])} if rc != 0 or name == "plan" else result


def python_env(*, home: Path, site: Path | None) -> dict:
    """The environment of every step: the scratch registry, no network, the carried wheels and this repo importable."""
    paths = [str(site)] if site else []
    paths += [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {**os.environ, "RLHF_HOME": str(home), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(paths)}


def install_wheels(wheels: Path, site: Path) -> Path | None:
    """Install the carried wheels into `site` when this Python lacks trl or datasets; None when it needs none."""
    probe = subprocess.run([sys.executable, "-c", "import trl, datasets"], capture_output=True)
    if probe.returncode == 0:
        return None
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"gpu-check: trl or datasets is missing and {wheels} holds no wheels; run `make gpu-wheels` "
                         f"on a machine with network and carry {wheels.name} along")
    print(f"gpu-check: installing {len(found)} wheels from {wheels} into {site} (offline)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)], check=True)
    return site


def registry_entries(env: dict) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "registry", "list", "--json", "--pipeline", "gpu-bench"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else []


def newest(entries: list[dict], stage: str) -> dict | None:
    complete = [e for e in entries if e["stage"] == stage and e["status"] == "complete"]
    return complete[-1] if complete else None


def history_rows(entry: dict | None) -> list[dict]:
    path = Path(entry["path"]) / "history.jsonl" if entry else None
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def trainer_figures(entry: dict | None) -> dict:
    """tokens/s, MFU and peak memory of an SFT or RM run: the registry's, else the trainer's last log."""
    metrics = dict(entry["metrics"]) if entry else {}
    final = [row for row in history_rows(entry) if "train/tokens_per_s" in row]
    if final:
        metrics = {**final[-1], **metrics}
    figures = {name: metrics.get(f"train/{name}") for name in ("tokens_per_s", "mfu", "peak_memory_mb")}
    # Steady state: the median logging window after the first (which holds warm-up and, with `compile`, compiling).
    windows = [row for row in history_rows(entry) if "perf/tokens_per_s" in row][1:]
    for name in ("tokens_per_s", "mfu"):
        values = [row[f"perf/{name}"] for row in windows if isinstance(row.get(f"perf/{name}"), (int, float))]
        figures[f"steady_{name}"] = statistics.median(values) if values else None
    return figures


def ppo_figures(entry: dict | None) -> dict:
    """Each phase's seconds, tokens/s and MFU, the median over the PPO steps after the first (warm-up)."""
    rows = [row for row in history_rows(entry) if "perf/step_seconds" in row]
    rows = rows[1:] if len(rows) > 1 else rows

    def mean(key: str) -> float | None:  # the median: a step that compiled a new shape is an outlier, not a mean
        values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
        return statistics.median(values) if values else None

    figures = {"steps_timed": len(rows), "step_seconds": mean("perf/step_seconds"),
               "tokens_per_s": mean("perf/tokens_per_s"),
               "peak_memory_mb": (entry or {}).get("metrics", {}).get("train/peak_memory_mb")}
    for phase in PHASES:
        for name in ("seconds", "tokens_per_s", "mfu"):
            figures[f"{phase}_{name}"] = mean(f"perf/{phase}_{name}")
    if figures["generate_seconds"] is not None and figures["step_seconds"]:
        figures["generate_share"] = figures["generate_seconds"] / figures["step_seconds"]
    else:
        figures["generate_share"] = None
    return figures


def device_facts(device: str, env: dict) -> dict:
    facts = {}
    for name in ("torch", "transformers", "trl"):
        try:
            facts[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            facts[name] = None
    if device == "cpu":
        return {"device": "cpu", **facts}
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"], cwd=REPO,
                          env=env, capture_output=True, text=True)
    return {"device": done.stdout.strip() if done.returncode == 0 else "unknown", **facts}


def _cell(value, kind: str, *, applies: bool = True) -> str:
    if not applies:
        return "-"
    if value is None:
        return "not recorded"
    return {"rate": f"{value:,.0f}", "share": f"{value:.1%}", "seconds": f"{value:.2f}", "mib": f"{value:,.0f}"}[kind]


def _verdict(value: float | None, *, at_least: float | None = None, at_most: float | None = None) -> str:
    if value is None:
        return "not recorded"
    met = value >= at_least if at_least is not None else value <= at_most
    return f"{value:.1%} ({'met' if met else 'not met'})"


def _steady(figures: dict) -> float | None:
    return figures.get("steady_mfu") if figures.get("steady_mfu") is not None else figures.get("mfu")


def markdown(summary: dict) -> str:
    """The summary as a short Markdown table (MFU and trainer memory are GPU-only; '-' where a cell cannot apply)."""
    sft, rm, ppo, gpu = summary["sft"], summary["rm"], summary["ppo"], summary["device"] != "cpu"
    memory = "peak memory (MiB, allocated)" if gpu else "peak memory (MiB; RSS for PPO)"
    rows = [("SFT", sft["tokens_per_s"], sft["mfu"], None, None, sft["peak_memory_mb"]),
            ("SFT steady (median log window after the first)", sft.get("steady_tokens_per_s"),
             sft.get("steady_mfu"), None, None, None),
            ("RM", rm["tokens_per_s"], rm["mfu"], None, None, rm["peak_memory_mb"]),
            ("RM steady (median log window after the first)", rm.get("steady_tokens_per_s"),
             rm.get("steady_mfu"), None, None, None)]
    step = ppo["step_seconds"]
    for phase in PHASES:
        seconds = ppo[f"{phase}_seconds"]
        rows.append((f"PPO {phase}", ppo[f"{phase}_tokens_per_s"], ppo[f"{phase}_mfu"], seconds,
                     seconds / step if seconds is not None and step else None, None))
    rows.append((f"PPO step ({ppo['steps_timed']} timed; tokens/s of responses)", ppo["tokens_per_s"], None, step,
                 None, ppo["peak_memory_mb"]))
    lines = [f"# GPU check: {summary['device']}, {summary['date']}", "",
             f"Model: {summary['model']}; torch {summary.get('torch')}, transformers {summary.get('transformers')}, "
             f"trl {summary.get('trl')}.", "",
             f"| stage / phase | tokens/s | MFU | seconds per step | share of the PPO step | {memory} |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, rate, mfu, seconds, share, mib in rows:
        ppo_row, phase_row = name.startswith("PPO"), name.startswith("PPO ") and "step" not in name
        lines.append(f"| {name} | {_cell(rate, 'rate', applies=not name.endswith('other'))} | "
                     f"{_cell(mfu, 'share', applies=gpu and not name.endswith('other') and 'step' not in name)} | "
                     f"{_cell(seconds, 'seconds', applies=ppo_row)} | {_cell(share, 'share', applies=phase_row)} | "
                     f"{_cell(mib, 'mib', applies=(gpu and not ppo_row) or (ppo_row and not phase_row))} |")
    if gpu:
        targets = summary["targets"]
        lines += ["", "Targets (issue 15, one H200, the 0.5B shape): "
                  f"SFT MFU {_verdict(_steady(sft), at_least=targets['sft_mfu'])}, "
                  f"RM MFU {_verdict(_steady(rm), at_least=targets['rm_mfu'])} (steady, else whole run), "
                  f"PPO update MFU {_verdict(ppo['update_mfu'], at_least=targets['ppo_update_mfu'])}, "
                  f"generation share {_verdict(ppo['generate_share'], at_most=targets['ppo_generate_share_max'])}."]
    lines += ["", "Steps: " + ", ".join(f"{name} {step['status']} ({step['seconds']} s)"
                                         for name, step in summary["steps"].items())]
    if summary.get("plan"):
        lines += ["", "`rlhf plan`:", "", "```", summary["plan"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, help="folder for summary.json, summary.md and gpu-check.log "
                                                 "(default runs/gpu-check/<device>-<time>)")
    parser.add_argument("--home", type=Path, help="scratch registry (RLHF_HOME; default <out>/registry)")
    parser.add_argument("--shape", help="tiny.shape on cuda (default: the pipeline's, qwen2.5-0.5b)")
    parser.add_argument("--wheels", type=Path, default=REPO / ".gpu-wheels", help="carried wheels (make gpu-wheels)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="seconds for the whole check")
    parser.add_argument("--skip-tests", action="store_true", help="leave out step 2, the gpu tests")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    stamp = datetime.now(timezone.utc)
    out = (args.out or REPO / "runs" / "gpu-check" / f"{args.device}-{stamp:%Y%m%d-%H%M%S}").resolve()
    home = (args.home or out / "registry").resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps: dict[str, dict] = {}

    # 1. wheels
    site = install_wheels(args.wheels, Path("/tmp/gpu-check-site")) if args.device == "cuda" else None
    if site:
        sys.path.insert(0, str(site))  # for the versions read below
    env = python_env(home=home, site=site)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU form stays on the CPU on a GPU box too
    # 2. tests marked gpu (skipped without one), collected from the files that mark any: collecting the whole
    # suite would import every test module
    if not args.skip_tests:
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        marked = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                        if "mark.gpu" in p.read_text(encoding="utf-8"))
        steps["tests"] = run_step("tests", [*pytest, "-m", "gpu", *marked], env=env, out=out, budget=budget)
    # 3. data
    if args.device == "cuda":
        data, overrides = REPO / "runs" / "gpu-bench-data", [*CUDA_STAGES]
        overrides += [f"tiny.shape={args.shape}"] if args.shape else []
        flags = CUDA_DATA
    else:
        data, flags = home / "data", CPU_DATA
        overrides = [*CPU_MODEL, *CPU_STAGES, f"sft.dataset={data}/sft.jsonl", f"rm.dataset={data}/comparisons.jsonl",
                     f"ppo.dataset={data}/prompts.jsonl", f"ppo.eval_prompts={data}/eval_prompts.jsonl"]
    steps["data"] = run_step("data", [sys.executable, "-m", "rlhf.tasks.digest", str(data), *flags], env=env,
                             out=out, budget=budget)
    # 4. the stages, as a user runs them
    for stage in ("sft", "rm", "ppo"):
        command = [sys.executable, "-m", "rlhf.cli", stage, "--pipeline", PIPELINE, "--run", RUN, "--force",
                   *overrides]
        steps[stage] = run_step(stage, command, env=env, out=out, budget=budget)
        if steps[stage]["status"] != "ok":
            break
    # 5. rlhf plan, where this version has it
    plan = None
    has_plan = subprocess.run([sys.executable, "-m", "rlhf.cli", "plan", "--help"], cwd=REPO, env=env,
                              capture_output=True).returncode == 0
    if has_plan:
        steps["plan"] = run_step("plan", [sys.executable, "-m", "rlhf.cli", "plan", "--pipeline", PIPELINE,
                                          *overrides], env=env, out=out, budget=budget)
        plan = steps["plan"].pop("output_tail")
    # 6. summary
    entries = registry_entries(env)
    base = newest(entries, "base")
    params = (base or {}).get("metrics", {}).get("num_parameters")
    shape = args.shape or ("qwen2.5-0.5b" if args.device == "cuda" else "two-layer qwen2 (cpu form)")
    summary = {
        **device_facts(args.device, env), "date": f"{stamp:%Y-%m-%d %H:%M} UTC", "pipeline": PIPELINE,
        "overrides": overrides,
        "model": f"{shape}, {params:,} parameters" if params else shape,
        "sft": trainer_figures(newest(entries, "sft")), "rm": trainer_figures(newest(entries, "rm")),
        "ppo": ppo_figures(newest(entries, "ppo")), "targets": TARGETS, "steps": steps, "plan": plan,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    table = markdown(summary)
    (out / "summary.md").write_text(table, encoding="utf-8")
    print(table)
    print(out / "summary.json")
    # `rlhf plan` only reports; the tests and the stages decide
    return 0 if all(step["status"] == "ok" for name, step in steps.items() if name != "plan") else 1


if __name__ == "__main__":
    sys.exit(main())
