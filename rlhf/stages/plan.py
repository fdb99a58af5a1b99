"""`rlhf plan` / `make plan`: what `make sft rm ppo` (and `make dpo`, when the pipeline has a dpo section) would do,
like `make -n`, without training or registering anything.

    make plan [PIPELINE=pipelines/tiny.yaml] [SET="ppo.kl_coef=0.2"] [FORCE=1] [RESTART=1]
    rlhf plan --pipeline pipelines/tiny.yaml [--round 2] [--json]

Per stage: up to date (which entry), would resume (which attempt, from which checkpoint), would train (with which
parents, or after which earlier stage), or cannot run (why). Each stage is asked through its own `resolve`, and
the decision is the runner's own `decide`, so the plan says what the stage would do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rlhf.errors import RLHFError
from rlhf.pipeline import lineage, preflight
from rlhf.pipeline import memory as estimator
from rlhf.pipeline.checkpoints import last_checkpoint
from rlhf.pipeline.config import Pipeline
from rlhf.pipeline.model_shape import ModelShape, Shapes, resolve_shapes, shape_from_folder
from rlhf.pipeline.order import SECTIONS, round_stages, waits_for
from rlhf.pipeline.registry import Registry
from rlhf.stages import collect, dpo, ppo, rm, sft
from rlhf.stages.base import ensure_base
from rlhf.stages.runner import CHECKPOINTS, decide

RESOLVERS = {"sft": sft.resolve, "rm": rm.resolve, "ppo": ppo.resolve, "dpo": dpo.resolve}


@dataclass
class StagePlan:
    stage: str
    round: int
    action: str  # up_to_date | resume | train | busy | blocked
    entry: str | None = None  # the complete, interrupted or running entry concerned
    roles: dict[str, str] = field(default_factory=dict)  # parent role -> entry id, or "new <stage>"
    after: list[str] = field(default_factory=list)  # earlier stages of this plan it waits for
    detail: str = ""  # for people: the checkpoint it resumes from, why it cannot run

    def line(self) -> str:
        parents = ", ".join(f"{role} {who}" for role, who in self.roles.items())
        what = {
            "up_to_date": f"up to date    {self.entry}",
            "resume": f"would resume  {self.entry} {self.detail}",
            "train": "would train   a new entry" + (f" after {' and '.join(self.after)}" if self.after else ""),
            "busy": f"running       {self.entry} {self.detail}",
            "blocked": f"cannot run    {self.detail}",
        }[self.action]
        return f"  {self.stage:8s} {what}" + (f"\n  {'':8s} parents: {parents}" if parents else "")


def plan(pipeline: Pipeline, registry: Registry, *, where: str, round: int = 1, force: bool = False,
         restart: bool = False, processes: int = 1) -> list[StagePlan]:
    """What each stage of `round` would do now, in pipeline order."""
    plans: list[StagePlan] = []
    hub = preflight.Hub(timeout=preflight.HUB_TIMEOUT_S)
    for stage in round_stages(round):
        if stage in SECTIONS and getattr(pipeline, stage) is None:
            continue
        retrained = [p.stage for p in plans if p.action in ("train", "resume", "busy")
                     and p.stage in waits_for(stage, round=round)]
        hub = preflight.Hub(timeout=hub.timeout, unreachable=hub.unreachable)  # each stage's own sources, once
        # a plan of collect reads none of its data: it samples nothing
        missing = preflight.check_sources(pipeline, stages=(stage,), where=where, hub=hub) if stage in SECTIONS else []
        if missing:  # without its data (a hub data set, offline) the stage's inputs cannot be known
            plans.append(StagePlan(stage, round, "blocked", detail="cannot tell without its data: " + missing[0]))
            continue
        plans.append(_stage_plan(pipeline, registry, stage, where=where, round=round, force=force, restart=restart,
                                 processes=processes, retrained=retrained))
    return plans


def _stage_plan(pipeline: Pipeline, registry: Registry, stage: str, *, where: str, round: int, force: bool,
                restart: bool, processes: int, retrained: list[str]) -> StagePlan:
    if stage == "collect":
        return _collect_plan(pipeline, registry, where=where, round=round, retrained=retrained)
    kwargs = {"processes": processes} if stage == "ppo" else {}
    try:
        found = RESOLVERS[stage](pipeline, registry, where=where, round=round, dry=True, **kwargs)
    except RLHFError as err:  # a parent that does not exist yet: fine if an earlier stage of the plan makes it
        if retrained:
            return StagePlan(stage, round, "train", after=retrained)
        return StagePlan(stage, round, "blocked", detail=str(err))
    inputs = found.inputs
    if inputs is None:  # the starting model is built first (the tiny model, from the pipeline's texts)
        return StagePlan(stage, round, "train", roles={"base": "new base (built first)"})
    parents = {role: registry.get(entry_id) for role, entry_id in inputs.roles.items()}
    waits = sorted({p.stage for p in parents.values() if p.stage in retrained}, key=retrained.index)
    roles = {role: (f"new {p.stage}" if p.stage in waits else p.id) for role, p in parents.items()}
    if waits:  # its parents will be replaced by the entries this plan makes
        return StagePlan(stage, round, "train", roles=roles, after=waits)
    decision = decide(registry, inputs, force=force, restart=restart)
    entry = decision.entry
    if decision.action == "resume":
        found_checkpoint = last_checkpoint(Path(entry.path) / CHECKPOINTS)
        start = f"from {found_checkpoint.name}" if found_checkpoint else "from its start (no complete checkpoint)"
        return StagePlan(stage, round, "resume", entry=entry.id, roles=roles,
                         detail=f"(attempt {entry.attempts + 1}, {start})")
    if decision.action == "busy":
        return StagePlan(stage, round, "busy", entry=entry.id, roles=roles, detail=f"(pid {entry.pid} on {entry.host})")
    detail = f"(gives up {decision.superseded.id})" if decision.superseded else ""
    return StagePlan(stage, round, decision.action, entry=entry.id if entry else None, roles=roles, detail=detail)


def _collect_plan(pipeline: Pipeline, registry: Registry, *, where: str, round: int,
                  retrained: list[str]) -> StagePlan:
    """Collecting samples from the policy; whether that has been done for this round is all a plan can tell."""
    done = lineage.newest(registry, stage="collect", pipeline=pipeline.name, round=round)
    if done is not None:
        return StagePlan("collect", round, "up_to_date", entry=done.id, roles=done.roles)
    try:
        found = collect.resolve(pipeline, registry, where=where, round=round, dry=True)
    except RLHFError as err:
        return StagePlan("collect", round, "blocked", detail=str(err))
    return StagePlan("collect", round, "train", roles={"policy": found.policy.id}, after=retrained)


def render(plans: list[StagePlan], *, header: str) -> str:
    return "\n".join([header, *(p.line() for p in plans)])


@dataclass
class MemoryPlan:
    """Each stage's estimated peak memory per GPU (rlhf/pipeline/memory.py), as text and for --json."""

    text: str
    stages: dict[str, dict] = field(default_factory=dict)

    def as_json(self) -> dict:
        return self.stages


def memory(pipeline: Pipeline, registry: Registry, stages: list[str], *, processes: int, on_gpu: bool,
           gpu_bytes: int | None, verbose: bool = False) -> MemoryPlan:
    """The estimate of every stage that trains a model, against `gpu_bytes` when a GPU is visible; a stage that
    does not fit gets the cheapest change that does. A model whose shape cannot be found (a hub id not in the local
    cache) is said in one line, with what would make the estimate possible."""
    strategy = estimator.strategy_of(pipeline)
    if strategy == "single" and processes > 1:
        strategy = "ddp"
    device = "cuda" if on_gpu else "cpu"
    lines = [f"memory per {'GPU' if on_gpu else 'process'} (estimate, {strategy}, {processes} process(es)"
             + (f", against {estimator.size(gpu_bytes)}" if gpu_bytes else "") + "):"]
    found = MemoryPlan(text="")
    built = _built_policy(pipeline, registry)
    for stage in stages:
        if stage not in estimator.STAGES:
            continue
        try:
            shapes = None
            if built is not None:  # the tiny model's real vocabulary, in the policy and a same-shaped RM
                shapes, _ = resolve_shapes(pipeline, stage)
                same = shapes.reward is None or shapes.reward == shapes.policy
                shapes = Shapes(policy=built, reward=built if same else shapes.reward)
            estimate = estimator.estimate_stage(pipeline, stage, strategy=strategy, processes=processes,
                                                device=device, shapes=shapes)
        except RLHFError as err:
            lines.append(f"  {stage}: cannot estimate: {err}")
            continue
        change = None
        if gpu_bytes is not None and not estimate.fits(gpu_bytes):
            change = estimator.cheapest_change(pipeline, stage, strategy=strategy, processes=processes,
                                               gpu_bytes=gpu_bytes, device=device, shapes=shapes)
        lines += ["  " + line for line in estimator.render(estimate, gpu_bytes=gpu_bytes, change=change,
                                                            verbose=verbose).splitlines()]
        found.stages[stage] = {"peak_bytes": estimate.total, "needs_bytes": estimate.needs(),
                               "fits": estimate.fits(gpu_bytes) if gpu_bytes else None,
                               "change": change.overrides if change else None}
    found.text = "\n".join(lines)
    return found


def _built_policy(pipeline: Pipeline, registry: Registry) -> ModelShape | None:
    """The tiny model's real shape once its base entry exists (its vocabulary is the trained tokenizer's, below
    the spec's upper bound); None otherwise."""
    if pipeline.model != "tiny":
        return None
    try:
        base = ensure_base(pipeline, registry, where="plan", build=False)
    except RLHFError:  # its texts are not all there: the plan says which stage lacks data
        return None
    return shape_from_folder(base.path) if base is not None else None
