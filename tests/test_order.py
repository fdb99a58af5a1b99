"""The stage order is written once, in rlhf/pipeline/order.py (issue #16): a literal sequence of stage names
anywhere else in the package is a second copy that drifts from the first. A membership test
(`stage in ("rm", "dpo")`) names a set, not an order, and is allowed.

    .venv/bin/python -m pytest -q tests/test_order.py
"""

from __future__ import annotations

import ast
from pathlib import Path

from rlhf.pipeline import order

PACKAGE = Path(__file__).resolve().parent.parent / "rlhf"
ORDER_PY = PACKAGE / "pipeline" / "order.py"


def stage_orders(source: str) -> list[tuple[int, tuple[str, ...]]]:
    """(line, names) of every tuple or list literal of two or more stage names, except the right side of `in`."""
    tree = ast.parse(source)
    sets = {id(right) for node in ast.walk(tree) if isinstance(node, ast.Compare)
            for op, right in zip(node.ops, node.comparators) if isinstance(op, (ast.In, ast.NotIn))}
    return [(node.lineno, tuple(e.value for e in node.elts)) for node in ast.walk(tree)
            if isinstance(node, (ast.Tuple, ast.List)) and id(node) not in sets and len(node.elts) >= 2
            and all(isinstance(e, ast.Constant) and e.value in order.STAGES for e in node.elts)]


def test_no_stage_order_outside_order_py():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line} {names}"
             for path in sorted(PACKAGE.rglob("*.py")) if path != ORDER_PY
             for line, names in stage_orders(path.read_text(encoding="utf-8"))]
    assert not found, ("a stage order written outside rlhf/pipeline/order.py; use its ROUND_ONE, LATER_ROUNDS, "
                       "round_stages or SECTIONS instead:\n  " + "\n  ".join(found))


def test_the_check_catches_a_copied_order():
    assert stage_orders('ROUNDS = ("collect", "rm", "ppo")\n') == [(1, ("collect", "rm", "ppo"))]
    assert stage_orders('for stage in ["sft", "rm"]:\n    pass\n') == [(1, ("sft", "rm"))]
    assert stage_orders('pairs = 2 if stage in ("rm", "dpo") else 1\n') == []  # a set, not an order
    assert stage_orders('MODES = ("full", "lora")\n') == []
    assert len(stage_orders(ORDER_PY.read_text(encoding="utf-8"))) >= 3  # the declarations themselves


def test_the_rounds_in_run_order():
    assert order.round_stages(1) == ("sft", "rm", "ppo", "dpo")  # DPO beside PPO, listed after it
    assert order.round_stages(2) == order.round_stages(7) == ("collect", "rm", "ppo")
    assert order.waits_for("ppo", round=1) == ("sft", "rm")
    assert order.waits_for("dpo", round=1) == ("sft", "rm")  # not PPO: it starts from the SFT policy and the RM
    assert order.waits_for("rm", round=3) == ("collect",)
    assert {*order.round_stages(1), *order.round_stages(2)} == set(order.TRAINED)  # every stage runs in some round
