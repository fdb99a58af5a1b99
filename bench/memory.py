"""The peak-memory estimator (rlhf/pipeline/memory.py) against the measured peak of real stage runs on the CPU.

    .venv/bin/python bench/memory.py                                # hidden 64, 512, 1024; sft, rm, ppo
    .venv/bin/python bench/memory.py --sizes 64 --stages sft rm     # a subset
    .venv/bin/python bench/memory.py --variants                     # and checkpointing, LoRA, top-N, ... at 512
    .venv/bin/python bench/memory.py --reuse --variants             # re-estimate against the last measurements

For each size it writes synthetic data in which three records in four are longer than the token budget (so every
batch's longest sequence fills `max_length`, as the estimate assumes, and most batches are padded), a pipeline file
whose `tiny` section has that hidden size, and runs the real stages (`rlhf.stages.sft.run`, `rm.run`, `ppo.run`:
TRL's trainers and our PPO loop, a few optimiser steps each) in one child process per stage, one torch thread, with
its own registry under runs/bench-memory/. It prints estimate against measurement per stage and per phase.

What is measured: the peak of the bytes the CPU allocator holds for tensors, over the stage's training loop only
(TRL: from the first `training_step` to the last step's logging, so loading, evaluation and saving are left out;
PPO: from the first rollout to the end of the last update). This is the CPU analogue of
`torch.cuda.max_memory_allocated`. torch's profiler with `profile_memory=True` records every allocation and free
of the CPU allocator with its size and time; the child runs under it from its first line, so the running sum of
those records is the bytes held at any moment (weights loaded later included: they are allocator memory too),
and zero-length `record_function` marks put the loop's start and end on the same clock. Neither RSS nor
`ru_maxrss` would do: they include the Python and torch runtime (~300 MB), glibc's arenas and pages kept after a
free, so a 5 MB model's peak would be lost in the noise; a TorchDispatchMode sees only tensors made by operators
it intercepts, not buffers a kernel allocates inside itself (the fused head's tiles, logsumexp's workspace).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from rlhf.pipeline.memory import STAGES  # the stages the estimator covers

REPO = Path(__file__).resolve().parent.parent
HOME = REPO / "runs" / "bench-memory"
SIZES = (64, 512, 1024)
MiB = 2**20


# --- the pipeline and data of one size --------------------------------------------------------------------------

def tiny_section(hidden: int) -> dict:
    """The model of one size: 4 layers, head width 16 (hidden 64) or 64, MLP 4x, a full 1,024-token vocabulary."""
    heads = max(hidden // 64, 4)
    return {"vocab_size": 1024, "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": 4,
            "num_attention_heads": heads, "num_key_value_heads": heads}


BASE_SETTINGS = {
    "sft": {"batch_size": 8, "max_length": 64, "max_steps": 3, "gradient_accumulation_steps": 1},
    "rm": {"batch_size": 8, "max_length": 64, "max_steps": 3, "gradient_accumulation_steps": 1},
    # 2 PPO steps of 16 prompts, each 2 optimiser steps of 2 x 4 episodes: the second step's rollout and updates
    # run with the optimiser states allocated, as every step of a real run does.
    "ppo": {"episodes": 32, "rollout_batch_size": 16, "mini_batch_size": 8, "micro_batch_size": 4, "ppo_epochs": 1,
            "max_prompt_length": 32, "max_new_tokens": 24},
}

# Extra runs (at --variant-size) that exercise the estimate's other terms: (tiny section changes, stage changes).
VARIANTS = {
    "checkpointing": ({}, {"sft": {"gradient_checkpointing": True}, "rm": {"gradient_checkpointing": True},
                           "ppo": {"gradient_checkpointing": True}}),
    "lora": ({}, {"sft": {"mode": "lora"}, "rm": {"mode": "lora"}, "ppo": {"mode": "lora"}}),
    "top_n": ({}, {"sft": {"mode": "top_n", "top_n_layers": 2}, "rm": {"mode": "top_n", "top_n_layers": 2}}),
    # accumulation in SFT and RM; none in PPO (micro batch = minibatch)
    "accumulation": ({}, {"sft": {"batch_size": 4, "gradient_accumulation_steps": 2},
                          "rm": {"batch_size": 4, "gradient_accumulation_steps": 2},
                          "ppo": {"micro_batch_size": 8}}),
    # Qwen2-style: grouped-query attention, q/k/v biases, an untied 32,768-row vocabulary (most ids never used)
    "qwen2-vocab": ({"architecture": "qwen2", "num_key_value_heads": 2, "model_vocab_size": 32768,
                     "tie_word_embeddings": False}, {"sft": {}, "rm": {}, "ppo": {}}),
    # the reward model a BERT-style encoder with its own tokenizer; PPO's value model then starts from the policy
    "encoder-rm": ({}, {"sft": {}, "ppo": {},
                        "rm": {"init": "tiny-encoder", "encoder": {"hidden_size": 256, "intermediate_size": 1024,
                                                                   "num_hidden_layers": 2,
                                                                   "num_attention_heads": 4}}}),
}


def write_data(folder: Path, *, seed: int = 0) -> None:
    """Texts of made-up words: the tiny tokenizer fills its 1,024-token vocabulary, and every SFT example, RM pair
    and PPO prompt is longer than the stage's token budget, so each batch is full-length, as the estimate assumes.
    A short prompt and a long completion (SFT) keep completion tokens after truncation."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lexicon = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(3000)]

    def words(n: int) -> str:
        return " ".join(rng.choice(lexicon) for _ in range(n))

    folder.mkdir(parents=True, exist_ok=True)
    def length(long: int) -> int:  # a quarter of the records short: most batches are padded, as real ones are
        return long if rng.random() < 0.75 else 8

    rows = {
        "sft.jsonl": [{"prompt": words(4) + "\n", "completion": words(length(80))} for _ in range(60)],
        "comparisons.jsonl": [{"prompt": words(4) + "\n", "chosen": words(length(80)), "rejected": words(length(80))}
                              for _ in range(60)],
        "prompts.jsonl": [{"prompt": words(length(60)) + "\n"} for _ in range(80)],
    }
    for name, records in rows.items():
        with open(folder / name, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(r) + "\n" for r in records)


def write_pipeline(folder: Path, *, hidden: int, variant: str | None) -> Path:
    import yaml

    data = folder.parent / "data"
    stage = {name: dict(settings) for name, settings in BASE_SETTINGS.items()}
    tiny_changes, stage_changes = VARIANTS[variant] if variant else ({}, {})
    for name, extra in stage_changes.items():
        stage[name].update(extra)
    common = {"eval_fraction": 0.1, "eval_batch_size": 4, "learning_rate": 1e-5, "logging_steps": 1,
              "save_steps": 1000, "precision": "fp32"}
    pipeline = {
        "name": f"mem-h{hidden}" + (f"-{variant}" if variant else ""), "model": "tiny", "seed": 0,
        "tiny": {**tiny_section(hidden), **tiny_changes},
        "sft": {"dataset": str(data / "sft.jsonl"), **common, **stage["sft"]},
        "rm": {"dataset": str(data / "comparisons.jsonl"), "init": "sft", **common, **stage["rm"]},
        "ppo": {"dataset": str(data / "prompts.jsonl"), "eval_fraction": 0.1, "max_eval_prompts": 2,
                "eval_batch_size": 2, "learning_rate": 1e-5, "sample_steps": 0, "save_steps": 1000,
                "precision": "fp32", **stage["ppo"]},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False), encoding="utf-8")
    return path


# --- measuring, in the child process ---------------------------------------------------------------------------

class AllocationTrace:
    """Every allocation and free of the CPU allocator while open (torch's profiler, profile_memory=True), and named
    marks on the same clock. `held(start, end)` is the peak of the running sum of bytes between two marks."""

    def __init__(self):
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._series: list[tuple[int, int]] = []
        self._marks: list[tuple[int, str]] = []

    def __enter__(self) -> AllocationTrace:
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        self._profile.__exit__(*exc)
        events = self._profile.profiler.kineto_results.events()
        cpu = torch.autograd.DeviceType.CPU
        self._series = sorted((e.start_ns(), e.nbytes()) for e in events
                              if e.name() == "[memory]" and e.device_type() == cpu)
        self._marks = sorted((e.start_ns(), e.name()[len("mark/"):]) for e in events if e.name().startswith("mark/"))

    @staticmethod
    def mark(name: str) -> None:
        from torch.profiler import record_function

        with record_function("mark/" + name):
            pass

    def windows(self, start: str, end: str) -> list[tuple[int, int]]:
        """(start, end) times of each `start` mark and the first `end` mark after it."""
        found, opened = [], None
        for t, name in self._marks:
            if name == start and opened is None:
                opened = t
            elif name == end and opened is not None:
                found.append((opened, t))
                opened = None
        return found

    def peak(self, windows: list[tuple[int, int]]) -> tuple[int, int]:
        """(highest bytes held within any of `windows`, bytes held when the first one opened)."""
        held, peak, at_start, i = 0, 0, None, 0
        for t0, t1 in windows:
            while i < len(self._series) and self._series[i][0] < t0:
                held += self._series[i][1]
                i += 1
            if at_start is None:
                at_start = held
            peak = max(peak, held)
            while i < len(self._series) and self._series[i][0] <= t1:
                held += self._series[i][1]
                i += 1
                peak = max(peak, held)
        return peak, at_start or 0


def _wrap(owner, name: str, *, before: str | None = None, after: str | None = None) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before:
            AllocationTrace.mark(before)
        result = original(*args, **kwargs)
        if after:
            AllocationTrace.mark(after)
        return result

    setattr(owner, name, wrapped)


def install_marks(stage: str) -> None:
    """Marks around the training loop's parts. The stage modules are run unchanged; only these calls are wrapped."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(lambda *a: AllocationTrace.mark("optimiser"))
    register_optimizer_step_post_hook(lambda *a: AllocationTrace.mark("optimiser-end"))
    if stage in ("sft", "rm"):
        from transformers import Trainer

        _wrap(Trainer, "training_step", before="loop", after="backward-end")
        _wrap(Trainer, "_maybe_log_save_evaluate", before="loop-end")
        return
    loop = _ppo_loop_module()
    _wrap(loop, "sample", before="loop", after="generation-end")
    _wrap(loop, "collect_rollout", before="scoring", after="scoring-end")
    _wrap(loop, "ppo_update", before="update", after="update-end")
    _wrap(loop, "finish", before="loop-end")


def _ppo_loop_module():
    """rlhf/training/ppo/trainer.py, whose loop calls sample, collect_rollout and ppo_update, then finish."""
    from rlhf.training.ppo import trainer

    missing = [f for f in ("sample", "collect_rollout", "ppo_update", "finish") if not hasattr(trainer, f)]
    if missing:
        raise SystemExit(f"bench/memory.py: rlhf.training.ppo.trainer no longer has {', '.join(missing)}; "
                         "update install_marks")
    return trainer


def run_child(stage: str, pipeline_file: Path, result_file: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from rlhf.pipeline.config import load_pipeline
    from rlhf.pipeline.registry import Registry, default_root
    from rlhf.stages import ppo, rm, sft

    pipeline, path = load_pipeline(pipeline_file)
    module = {"sft": sft, "rm": rm, "ppo": ppo}[stage]
    install_marks(stage)
    began = time.perf_counter()
    with AllocationTrace() as trace:
        entry = module.run(pipeline, registry=Registry(default_root()), where=str(path))
    loop = trace.windows("loop", "loop-end")
    loop = [(loop[0][0], loop[-1][1])] if loop else []
    peak, at_start = trace.peak(loop)
    phases = {"optimiser step": trace.peak(trace.windows("optimiser", "optimiser-end"))[0]}
    if stage == "ppo":
        for phase, (start, end) in {"generation": ("loop", "generation-end"), "scoring": ("scoring", "scoring-end"),
                                    "update": ("update", "update-end")}.items():
            phases[phase] = trace.peak(trace.windows(start, end))[0]
    else:
        phases["forward and backward"] = trace.peak(trace.windows("loop", "backward-end"))[0]
    result = {"stage": stage, "peak": peak, "at_loop_start": at_start, "phases": phases, "entry": entry.path,
              "seconds": time.perf_counter() - began}
    result_file.write_text(json.dumps(result), encoding="utf-8")


# --- the comparison, in the parent ------------------------------------------------------------------------------

def measure(stage: str, pipeline_file: Path, home: Path, *, reuse: bool = False) -> dict:
    result_file = home / f"{stage}.result.json"
    if reuse and result_file.is_file():
        return json.loads(result_file.read_text(encoding="utf-8"))
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "RLHF_HOME": str(home), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, __file__, "--child", stage, "--pipeline", str(pipeline_file),
                           "--result", str(result_file)], env=env, capture_output=True, text=True)
    if done.returncode != 0 or not result_file.is_file():
        raise SystemExit(f"{stage} run failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(result_file.read_text(encoding="utf-8"))


def estimate(stage: str, pipeline_file: Path, home: Path):
    """The estimator's answer for this stage on the CPU, with the model shape read from the built base model's
    config.json (the tiny tokenizer's real vocabulary; the pipeline file alone gives only its upper bound)."""
    from rlhf.pipeline import memory
    from rlhf.pipeline.config import load_pipeline
    from rlhf.pipeline.model_shape import Shapes, shape_from_folder
    from rlhf.pipeline.registry import Registry

    pipeline, _ = load_pipeline(pipeline_file)
    built = {entry.config.get("model"): shape_from_folder(Path(entry.path))
             for entry in Registry(home).entries(stage="base", pipeline=pipeline.name, status="complete")}
    reward = built["tiny-encoder"] if pipeline.rm.init == "tiny-encoder" else built["tiny"]
    return memory.estimate_stage(pipeline, stage, strategy="single", processes=1, device="cpu",
                                 shapes=Shapes(policy=built["tiny"], reward=reward))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--variants", nargs="*", default=None, choices=sorted(VARIANTS),
                        help="also run these variants (no value: all) at --variant-size")
    parser.add_argument("--variant-size", type=int, default=512, help="hidden size of the variant runs")
    parser.add_argument("--json", type=Path, help="write the rows to this file as well")
    parser.add_argument("--reuse", action="store_true",
                        help="re-estimate against the measurements of an earlier run where they exist")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child, args.pipeline, args.result)
        return 0

    write_data(HOME / "data")  # the same seed writes the same files: reused runs stay up to date
    runs = [(hidden, None) for hidden in args.sizes]
    if args.variants is not None:
        runs += [(args.variant_size, v) for v in (args.variants or list(VARIANTS))]
    rows = []
    print(f"{'run':<20} {'stage':<5} {'estimate MiB':>12} {'measured MiB':>12} {'error':>7}  "
          "peak phase (estimate / measured)")
    for hidden, variant in runs:
        name = f"h{hidden}" + (f"-{variant}" if variant else "")
        home = HOME / name
        pipeline_file = write_pipeline(home, hidden=hidden, variant=variant)
        for stage in args.stages:
            if variant and stage not in VARIANTS[variant][1]:
                continue
            measured = measure(stage, pipeline_file, home, reuse=args.reuse)
            estimated = estimate(stage, pipeline_file, home)
            error = estimated.total / measured["peak"] - 1
            top = max(measured["phases"], key=measured["phases"].get)
            rows.append({"run": name, "stage": stage, "estimate": estimated.total, "measured": measured["peak"],
                         "error": error, "estimated_phase": estimated.phase, "measured_phase": top,
                         "estimated_phases": estimated.phases, "measured_phases": measured["phases"],
                         "seconds": measured["seconds"]})
            print(f"{name:<20} {stage:<5} {estimated.total / MiB:>12.1f} {measured['peak'] / MiB:>12.1f} "
                  f"{error:>+7.1%}  {estimated.phase} / {top}", flush=True)
            for phase, value in measured["phases"].items():
                guess = estimated.phases.get(phase)
                print(f"{'':<20} {'':<5} {'' if guess is None else f'{guess / MiB:.1f}':>12} {value / MiB:>12.1f}"
                      f"          {phase}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"worst error {worst['error']:+.1%} ({worst['run']} {worst['stage']}); "
          f"{sum(abs(r['error']) <= 0.15 for r in rows)} of {len(rows)} within 15%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
