"""The separate virtual environment that runs TRL 1.12's PPOTrainer for the benchmark (bench/trl_ppo.py).

TRL removed `trl.experimental.ppo` in 1.13, while our package runs on a newer TRL, so the reference PPO lives in
its own venv and is never a dependency of `rlhf`. This module runs under our venv's python and uses only the
standard library.

    python bench/trl_env.py [FOLDER]     # create it (once) and print its python

Pins: TRL 1.12.0 asks only for transformers>=4.56.2, accelerate>=1.4.0, datasets>=4.7.0 (peft>=0.8.0 as an extra).
Left free, pip resolves exactly the versions our own venv runs (transformers 5.23.0, accelerate 1.15.0,
datasets 5.2.0, peft 0.21.2), and PPOTrainer 1.12 trains with them on the CPU, so those are pinned: the two
sides of the benchmark then differ only in the PPO implementation, not in the model code underneath.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FOLDER = REPO / ".bench" / "trl-1.12"
MARKER = ".bench-installed"

# torch first, alone: a bare `torch` requirement would otherwise let pip pick a multi-GB CUDA build.
TORCH_SPEC = os.environ.get("BENCH_TORCH_SPEC", "torch==2.13.0")
PINS = (
    "trl==1.12.0",
    "transformers==5.23.0",
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "peft==0.21.2",
)
# What must import afterwards, with the version it must report.
EXPECTED = {"trl": "1.12.0", "transformers": "5.23.0"}
TAIL_LINES = 40


class TrlEnvError(RuntimeError):
    """The TRL venv could not be created or does not work."""


def _spec() -> dict:
    return {"python": sys.version.split()[0], "torch": TORCH_SPEC, "pins": list(PINS)}


def venv_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _log(message: str) -> None:
    print(f"[trl-env] {message}", file=sys.stderr, flush=True)


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(cmd: list[str], what: str) -> str:
    started = time.monotonic()
    _log(f"{what} ...")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise TrlEnvError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                          f"--- last {TAIL_LINES} lines of output ---\n{_tail(proc.stdout)}")
    _log(f"{what}: done in {time.monotonic() - started:.0f}s")
    return proc.stdout


def _installed(folder: Path) -> bool:
    marker = folder / MARKER
    if not marker.is_file() or not venv_python(folder).exists():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")) == _spec()
    except (OSError, ValueError):
        return False


def ensure_trl_venv(folder: Path = DEFAULT_FOLDER) -> Path:
    """Create (once) the TRL 1.12 venv at `folder` and return its python.

    Idempotent: a marker file records the pinned spec; when it matches, nothing is done. A folder without the
    marker (a failed or older install) is rebuilt from scratch, but only if it is a venv (has pyvenv.cfg), so a
    mistyped path never deletes anything else.
    """
    folder = Path(folder).resolve()
    python = venv_python(folder)
    if _installed(folder):
        _log(f"up to date: {folder}")
        return python
    started = time.monotonic()
    if folder.exists():
        if not (folder / "pyvenv.cfg").is_file():
            raise TrlEnvError(f"{folder} exists and is not a virtual environment; remove it or choose another folder")
        _log(f"rebuilding {folder} (missing marker or different pins)")
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", str(folder)], f"creating venv {folder}")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    _run(pip + [TORCH_SPEC], f"installing {TORCH_SPEC}")
    # torch is repeated so that the resolver can never swap it for another build.
    _run(pip + [TORCH_SPEC, *PINS], f"installing {' '.join(PINS)}")
    check = ("import json, torch, transformers, trl, accelerate, datasets; "
             "from trl.experimental.ppo import PPOConfig, PPOTrainer; "
             "print(json.dumps({m.__name__: m.__version__ for m in (torch, transformers, trl, accelerate, datasets)}))")
    out = _run([str(python), "-c", check], "checking that trl.experimental.ppo imports")
    versions = json.loads(out.strip().splitlines()[-1])
    for name, want in EXPECTED.items():
        if versions.get(name) != want:
            raise TrlEnvError(f"{name} in {folder} is {versions.get(name)}, expected {want}")
    (folder / MARKER).write_text(json.dumps(_spec(), indent=2) + "\n", encoding="utf-8")
    _log(f"ready in {time.monotonic() - started:.0f}s: {', '.join(f'{k} {v}' for k, v in versions.items())}")
    return python


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0] in ("-h", "--help")):
        print(f"usage: python {Path(__file__).name} [FOLDER]   (default {DEFAULT_FOLDER})", file=sys.stderr)
        return 2
    try:
        python = ensure_trl_venv(Path(argv[0]) if argv else DEFAULT_FOLDER)
    except TrlEnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
