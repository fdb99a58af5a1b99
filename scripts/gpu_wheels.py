"""Download the Python wheels a bare GPU box lacks, so that `make gpu-check` can install them there offline.

    make gpu-wheels                    (or: .venv/bin/python scripts/gpu_wheels.py [--out .gpu-wheels])

The lent GPU machine has no network. Its image holds torch, transformers, accelerate, peft and most of the
scientific stack (IMAGE_PACKAGES, as /work/.library/device/KINDS.md listed it on 2026-11-17) but not trl,
datasets or wandb. This takes those three and every dependency of theirs the image lacks, each at the version
this project's .venv runs (so the GPU runs what the tests ran), and downloads one wheel per package for the
image's CPython 3.12 on x86-64 Linux into an ignored folder that travels with the working tree (64 MiB in all,
wheels included: the size is checked and printed).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOTS = ("trl", "datasets", "wandb")
# The image's own Python packages (KINDS.md, "Python packages already there", read 2026-11-17).
IMAGE_LISTING = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
"""
IMAGE_PACKAGES = frozenset(IMAGE_LISTING.split())
# pip matches manylinux tags exactly: the ones the device README lists, and the common later ones.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
TREE_LIMIT_MIB = 64  # what travels to the device machine: working tree + carried wheels


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_packages(roots: tuple[str, ...], *, present: frozenset[str]) -> dict[str, str]:
    """{name: version installed here} for `roots` and their dependencies (for Python 3.12 on Linux, no extras),
    leaving out what `present` holds."""
    environment = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                   "implementation_name": "cpython", "extra": ""}
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = normalise(todo.pop())
        if name in found or name in present:
            continue
        found[name] = importlib.metadata.version(name)
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                todo.append(requirement.name)
    return found


def download(packages: dict[str, str], out: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for name, version in sorted(packages.items()):
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(out),
                   f"{name}=={version}"]
        subprocess.run(command, check=True)


def tree_bytes(repo: Path) -> int:
    """Bytes of what the device tool sends: tracked files and untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return sum((repo / name).stat().st_size for name in listed if name and (repo / name).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".gpu-wheels"), help="folder for the wheels (git-ignored)")
    args = parser.parse_args(argv)
    packages = missing_packages(ROOTS, present=IMAGE_PACKAGES)
    print("wheels for the GPU image: " + ", ".join(f"{n}=={v}" for n, v in sorted(packages.items())))
    shutil.rmtree(args.out, ignore_errors=True)  # one version of each: two would stop the offline install
    args.out.mkdir(parents=True)
    download(packages, args.out)
    wheels = sum(p.stat().st_size for p in args.out.glob("*.whl"))
    tree = tree_bytes(Path.cwd())
    total = (wheels + tree) / 2**20
    print(f"{len(list(args.out.glob('*.whl')))} wheels, {wheels / 2**20:.1f} MiB in {args.out}; working tree "
          f"{tree / 2**20:.1f} MiB; {total:.1f} of the {TREE_LIMIT_MIB} MiB a device call may carry")
    if total > TREE_LIMIT_MIB:
        print(f"error: {total:.1f} MiB is over the device tool's {TREE_LIMIT_MIB} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
