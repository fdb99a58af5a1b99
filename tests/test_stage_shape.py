"""Every stage has one shape (issue #16): `resolve` finds its data and its parents by role, `train` trains into an
attempt, and `run` hands both to the runner; `rlhf plan` asks the same `resolve`.

    .venv/bin/python -m pytest -q tests/test_stage_shape.py
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from rlhf.stages import collect, dpo, ppo, rm, sft

STAGES = {"sft": sft, "rm": rm, "ppo": ppo, "dpo": dpo, "collect": collect}
POSITIONAL, KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY


def shape(function) -> list[tuple[str, inspect._ParameterKind]]:
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]


def extras(function, common: list) -> list[inspect.Parameter]:
    """The parameters after the shared ones; asserts that the shared ones come first, alike."""
    assert shape(function)[:len(common)] == common, f"{function.__module__}.{function.__name__}: {shape(function)}"
    return list(inspect.signature(function).parameters.values())[len(common):]


@pytest.mark.parametrize("name", STAGES)
def test_train_has_one_signature(name):
    assert shape(STAGES[name].train) == [("pipeline", POSITIONAL), ("found", POSITIONAL), ("attempt", KEYWORD),
                                         ("registry", KEYWORD)]


@pytest.mark.parametrize("name", STAGES)
def test_resolve_and_run_share_their_parameters(name):
    """A stage may take more (PPO: processes; collect: its labels file), as keyword arguments with a default."""
    module = STAGES[name]
    resolve = [("pipeline", POSITIONAL), ("registry", POSITIONAL), ("where", KEYWORD), ("round", KEYWORD),
               ("dry", KEYWORD)]
    run = [("pipeline", POSITIONAL), ("registry", KEYWORD), ("where", KEYWORD), ("force", KEYWORD),
           ("restart", KEYWORD)]
    for function, common in ((module.resolve, resolve), (module.run, run)):
        more = extras(function, common)
        assert all(p.kind == KEYWORD and p.default is not p.empty for p in more), (name, function.__name__, more)


@pytest.mark.parametrize("name", STAGES)
def test_resolved_carries_the_registry_inputs(name):
    fields = {f.name for f in dataclasses.fields(STAGES[name].Resolved)}
    assert "inputs" in fields
