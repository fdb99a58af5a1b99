"""The package's layers, bottom to top, and the rule that imports only go down (or stay within a layer).

    core, tasks   pure code: PPO maths, rollout types, sampling, prompts; the gold tasks
    pipeline      config, registry, lineage, run tags, rounds, data, tracking, reports
    training      models, the tiny model, reward scoring, our PPO trainer
    stages        one module per stage, and the runner that skips, resumes, completes or fails it
    cli           the `rlhf` command
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rlhf"
LAYERS = (("rlhf.errors",), ("rlhf.core", "rlhf.tasks"), ("rlhf.pipeline",), ("rlhf.training",), ("rlhf.stages",),
          ("rlhf.cli",))


def layer_of(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[str]:
    """Every rlhf module that `path` imports, at module level or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("rlhf")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhf"):
            # `from rlhf.pipeline import run_tags` imports rlhf.pipeline.run_tags
            found += [f"{node.module}.{alias.name}" if (PACKAGE.parent / node.module.replace(".", "/") /
                                                        f"{alias.name}.py").exists() else node.module
                      for alias in node.names]
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(path):
    here = module_name(path)
    upward = [m for m in imported(path) if layer_of(m) > layer_of(here)]
    assert not upward, f"{here} (layer {LAYERS[layer_of(here)]}) imports from a higher layer: {upward}"


def test_the_layer_rule_catches_an_upward_import(tmp_path):
    """The checker itself: a pipeline module that imports a stage is caught."""
    bad = PACKAGE / "pipeline" / "config.py"
    assert layer_of("rlhf.stages.sft") > layer_of(module_name(bad))
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from rlhf.stages import sft\n")
    assert imported(source) == ["rlhf.stages.sft"]


def test_parsing_a_pipeline_file_imports_no_torch():
    """`rlhf plan`, `rlhf compare` and the pre-flight parse pipeline files; none of them should pay for torch."""
    code = ("import sys; from rlhf.pipeline.config import load_pipeline; "
            "load_pipeline('pipelines/tiny.yaml', []); load_pipeline('pipelines/qwen2.5-0.5b-tldr.yaml', []); "
            "heavy = [m for m in ('torch', 'transformers', 'tokenizers', 'trl', 'datasets') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
