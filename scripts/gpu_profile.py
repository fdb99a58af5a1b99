"""Where the time of a training step and of generation goes at a real model's shape: a short probe for a GPU lease.

    python3 scripts/gpu_profile.py --out DIR [--shape qwen2.5-0.5b] [--budget-s 200] [--device cuda]

It answers the questions behind issue 15's MFU figures, each in a few seconds, and stops early when --budget-s runs
out (a probe that does not start in time is reported as skipped):
1. launch: the cost of one tiny kernel launch, plain and replayed from a CUDA graph (is the step launch-bound?);
2. matmul: a large bf16 matrix product (the chip's ceiling as this torch build reaches it);
3. train: one causal-LM training step (forward, backward, fused AdamW) of the shape's random-weight model, median of
   a few, as the SFT stage runs it (fp32 weights under bf16 autocast) and in variants: pure bf16 weights, twice the
   batch, the loss over chunks of positions (the full logits never held at once), and last torch.compile;
4. profile: the kernels of one eager step (torch.profiler): GPU-busy time against wall time, the kernel count, the top
   kernels;
5. generate: 53 new tokens for 64 prompts of 512 tokens with the dynamic cache and with the static one.

Writes profile.json and prints a table last. The model is random weights of the shape (rlhf.pipeline.config's
TINY_SHAPES); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rlhf.core.flops import peak_bf16_flops, shape_from_config, training_flops_per_token  # noqa: E402
from rlhf.pipeline.config import TINY_SHAPES  # noqa: E402


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], *, device: torch.device, warm: int, repeat: int) -> float:
    """Median seconds of `fn` over `repeat` runs after `warm` untimed ones."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        began = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def build_model(shape: str, *, device: torch.device, dtype: torch.dtype, layers: int | None):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sizes = dict(TINY_SHAPES[shape])
    sizes.pop("architecture")
    vocab = sizes.pop("model_vocab_size")
    rope = sizes.pop("rope_theta")
    if layers:
        sizes["num_hidden_layers"] = layers
    config = Qwen2Config(vocab_size=vocab, max_position_embeddings=1024, attention_dropout=0.0,
                         rope_parameters={"rope_type": "default", "rope_theta": rope}, **sizes)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


def probe_launch(device: torch.device) -> dict:
    x = torch.zeros(16, device=device)
    n = 2000
    plain = timed(lambda: [x.add_(1) for _ in range(n)], device=device, warm=1, repeat=3) / n
    result = {"launch_us": plain * 1e6}
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            x.add_(1)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            for _ in range(n):
                x.add_(1)
        result["graph_launch_us"] = timed(graph.replay, device=device, warm=1, repeat=3) / n * 1e6
    return result


def probe_matmul(device: torch.device, size: int) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = timed(lambda: a @ b, device=device, warm=3, repeat=10)
    return {"size": size, "tflops": 2 * size ** 3 / seconds / 1e12}


def train_step_fn(model, batch: torch.Tensor, *, autocast: bool, chunked: bool, device: torch.device):
    """One step: forward, the mean next-token loss, backward, a fused AdamW step."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if chunked:  # logits only: the loss from the final hidden states and the head, the vocabulary in chunks
                hidden = model.model(input_ids=batch).last_hidden_state
                loss = chunked_loss(hidden, model.lm_head.weight, batch)
            else:
                loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
    return step


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, rows: int = 2048) -> torch.Tensor:
    """Next-token cross-entropy over `rows` token positions at a time, each chunk's logits recomputed in backward."""
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    total = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], rows):
        part = torch.utils.checkpoint.checkpoint(
            lambda h, t: torch.nn.functional.cross_entropy((h @ weight.t()).float(), t, reduction="sum"),
            flat[start:start + rows], targets[start:start + rows], use_reentrant=False)
        total = total + part
    return total / targets.numel()


def probe_train(args, device: torch.device, budget: Budget, *, compiled: bool) -> list[dict]:
    rows = []
    variants = [
        ("fp32 weights, bf16 autocast (the SFT stage)", dict(dtype=torch.float32, autocast=True, batch=args.batch)),
        ("bf16 weights", dict(dtype=torch.bfloat16, autocast=False, batch=args.batch)),
        ("fp32 + autocast, batch x2", dict(dtype=torch.float32, autocast=True, batch=2 * args.batch)),
        ("fp32 + autocast, chunked loss", dict(dtype=torch.float32, autocast=True, batch=args.batch, chunked=True)),
        ("fp32 + autocast, torch.compile", dict(dtype=torch.float32, autocast=True, batch=args.batch, compile=True)),
    ]
    if device.type != "cuda":
        variants = [(name, {**v, "autocast": False}) for name, v in variants if v["dtype"] == torch.float32]
    variants = [(name, v) for name, v in variants if bool(v.get("compile")) == compiled]
    for name, v in variants:
        if budget.left() < (90 if compiled else 20):
            rows.append({"variant": name, "skipped": "budget"})
            continue
        began = time.monotonic()
        try:
            model = build_model(args.shape, device=device, dtype=v["dtype"], layers=args.layers)
            if v.get("compile"):
                model = torch.compile(model)
            batch = torch.randint(0, 1000, (v["batch"], args.length), device=device)
            step = train_step_fn(model, batch, autocast=v["autocast"], chunked=v.get("chunked", False),
                                 device=device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = timed(step, device=device, warm=2, repeat=args.repeat)
            base = model._orig_mod if v.get("compile") else model
            flops = training_flops_per_token(shape_from_config(base.config, lm_head=True), context=args.length)
            tokens = v["batch"] * args.length
            peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
            rows.append({"variant": name, "step_s": seconds, "tokens_per_s": tokens / seconds,
                         "mfu": tokens * flops / seconds / peak if peak else None,
                         "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
                         if device.type == "cuda" else None,
                         "wall_s": time.monotonic() - began})
        except Exception as error:  # a variant that fails (out of memory, compile) is reported, the rest still run
            rows.append({"variant": name, "error": f"{type(error).__name__}: {str(error)[:300]}"})
        finally:
            model = step = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"train: {rows[-1]}", flush=True)
    return rows


def probe_profile(args, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model = build_model(args.shape, device=device, dtype=torch.float32, layers=args.layers)
    batch = torch.randint(0, 1000, (args.batch, args.length), device=device)
    step = train_step_fn(model, batch, autocast=device.type == "cuda", chunked=False, device=device)
    step()
    step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        sync(device)
        began = time.perf_counter()
        step()
        sync(device)
        wall = time.perf_counter() - began
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in events)  # kernels (and copies) on the GPU
    by_name: dict[str, float] = {}
    for e in events:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time
    top = sorted(by_name.items(), key=lambda item: -item[1])[:12]
    return {"wall_ms": wall * 1e3, "gpu_busy_ms": busy_us / 1e3, "kernels": len(events),
            "top_kernels_ms": [(name[:90], us / 1e3) for name, us in top]}


def probe_generate(args, device: torch.device, budget: Budget) -> list[dict]:
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.shape, device=device, dtype=dtype, layers=args.layers).eval()
    prompts = torch.randint(0, 1000, (args.gen_batch, args.prompt_length), device=device)
    for name, extra in [("dynamic cache", {}), ("static cache", {"cache_implementation": "static"})]:
        if budget.left() < 15:
            rows.append({"variant": name, "skipped": "budget"})
            continue
        try:
            def generate(extra=extra):
                with torch.no_grad():
                    return model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                          pad_token_id=0, eos_token_id=1, **extra)
            seconds = timed(generate, device=device, warm=1, repeat=2)
            rows.append({"variant": name, "seconds": seconds,
                         "ms_per_token": seconds / args.new_tokens * 1e3,
                         "tokens_per_s": args.gen_batch * args.new_tokens / seconds})
        except Exception as error:
            rows.append({"variant": name, "error": f"{type(error).__name__}: {str(error)[:300]}"})
        print(f"generate: {rows[-1]}", flush=True)
    return rows


def table(result: dict) -> str:
    lines = [f"# GPU profile: {result['device']}, {result['shape']}, torch {result['torch']}", ""]
    launch = result.get("launch", {})
    lines.append(f"launch: {launch.get('launch_us', float('nan')):.1f} us plain, "
                 f"{launch.get('graph_launch_us', float('nan')):.2f} us from a graph; "
                 f"matmul {result.get('matmul', {}).get('tflops', float('nan')):.0f} TFLOP/s")
    lines += ["", "| train step variant | s/step | tokens/s | MFU | peak GiB |", "| --- | --- | --- | --- | --- |"]
    for row in [*result.get("train", []), *result.get("compiled", [])]:
        if "step_s" in row:
            mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"
            mem = f"{row['peak_memory_gib']:.1f}" if row.get("peak_memory_gib") is not None else "-"
            lines.append(f"| {row['variant']} | {row['step_s']:.3f} | {row['tokens_per_s']:,.0f} | {mfu} | {mem} |")
        else:
            lines.append(f"| {row['variant']} | {row.get('error') or row.get('skipped')} | | | |")
    prof = result.get("profile")
    if prof:
        lines += ["", f"profile of one eager step: wall {prof['wall_ms']:.1f} ms, "
                      f"GPU busy {prof['gpu_busy_ms']:.1f} ms, {prof['kernels']} kernels"]
        lines += [f"  {ms:8.2f} ms  {name}" for name, ms in prof["top_kernels_ms"]]
    lines += ["", "| generation | s | ms/token | tokens/s |", "| --- | --- | --- | --- |"]
    for row in result.get("generate", []):
        if "seconds" in row:
            lines.append(f"| {row['variant']} | {row['seconds']:.2f} | {row['ms_per_token']:.1f} | "
                         f"{row['tokens_per_s']:,.0f} |")
        else:
            lines.append(f"| {row['variant']} | {row.get('error') or row.get('skipped')} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(TINY_SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (the CPU test)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--gen-batch", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=53)
    parser.add_argument("--matmul", type=int, default=8192)
    parser.add_argument("--budget-s", type=float, default=200)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    budget = Budget(args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "shape": args.shape, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    steps = [("launch", lambda: probe_launch(device)), ("matmul", lambda: probe_matmul(device, args.matmul)),
             ("train", lambda: probe_train(args, device, budget, compiled=False)),
             ("profile", lambda: probe_profile(args, device)),
             ("generate", lambda: probe_generate(args, device, budget)),
             ("compiled", lambda: probe_train(args, device, budget, compiled=True))]
    for name, probe in steps:
        if budget.left() < 10:
            result[name] = {"skipped": "budget"}
            continue
        try:
            result[name] = probe()
        except Exception as error:
            result[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        (args.out / "profile.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(f"{name}: done, {budget.left():.0f} s of the budget left", flush=True)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
