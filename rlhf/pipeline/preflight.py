"""One pre-flight, in the process you started, before any worker starts (issue #14).

    rlhf sft --pipeline pipelines/qwen2.5-0.5b-tldr.yaml      (every stage command runs it first)

It checks the device (a GPU pipeline on a CPU box stops here, naming pipelines/tiny.yaml), decides how many
processes `accelerate launch` starts, checks that the stage's data sets and model resolve (a local path exists,
or the hub id is reachable or already cached), and switches wandb to offline logging when its server does not
answer. A failure is an error with one line per problem, raised before anything is launched or written; the
CLI prints it and exits 2. Parsing stays light: torch and datasets are imported inside the checks that need them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import ConfigError, RLHFError
from rlhf.pipeline import launch, tracking
from rlhf.pipeline.config import DataSource, Pipeline
from rlhf.pipeline.order import LATER_ROUNDS, TRAINED
from rlhf.pipeline.registry import is_entry_id

CPU_PIPELINE = "pipelines/tiny.yaml"
HUB_TIMEOUT_S = 10.0  # per hub request; a refused connection fails at once, a silent one after this
STAGES_OF_COMMAND = {**{stage: (stage,) for stage in TRAINED}, "rounds": LATER_ROUNDS}
RM_INIT_NAMES = ("sft", "base", "tiny-encoder")  # rm.init values that are not a model to fetch
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # as rlhf.training.models, which imports torch


class PreflightError(RLHFError):
    """One or more problems found before launching; the message has one line per problem."""


@dataclass(frozen=True)
class Machine:
    """What this machine offers the stages."""

    gpus: int  # CUDA devices visible to this process
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES as set, for messages

    def describe(self) -> str:
        shown = f" (CUDA_VISIBLE_DEVICES={self.visible_devices})" if self.visible_devices is not None else ""
        return f"{self.gpus} GPU(s) visible{shown}"


def this_machine() -> Machine:
    """Count the GPUs this process may use; torch counts them through NVML where it can, so the launching
    process creates no CUDA context (which would hold GPU memory for the whole run)."""
    import torch

    return Machine(gpus=torch.cuda.device_count(), visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))


def run(pipeline: Pipeline, *, command: str, where: str, nproc: int | None, machine: Machine) -> launch.Launch | None:
    """Check everything `rlhf <command>` needs; returns the launch to make (None: run in this process)."""
    stages = STAGES_OF_COMMAND[command]
    require_device(pipeline, stages=stages, where=where, machine=machine)  # alone: nothing else matters then
    problems = []
    found = None
    try:
        found = plan_launch(pipeline, nproc=nproc, where=where, machine=machine)
    except ConfigError as err:
        problems.append(str(err))
    problems += check_sources(pipeline, stages=stages, where=where)
    if problems:
        raise PreflightError("\n".join(problems) if len(problems) == 1 else
                             f"{len(problems)} problems, nothing was started:\n  " + "\n  ".join(problems))
    tracking.check_server()  # never fails: an unreachable server means offline logging
    return found


# ---- device and processes ---------------------------------------------------------------------------------

def needs_gpu(pipeline: Pipeline, *, stages: tuple[str, ...]) -> bool:
    """bf16/fp16 in one of `stages`, or a GPU accelerate config."""
    return bool(_gpu_needs(pipeline, stages=stages)[0])


def require_device(pipeline: Pipeline, *, stages: tuple[str, ...], where: str, machine: Machine) -> None:
    """A pipeline that needs a GPU (bf16/fp16 in a stage it runs, or a GPU accelerate config) stops on a box
    without one. `precision: auto` is fp32 there and runs."""
    if machine.gpus > 0:
        return
    needs, instead = _gpu_needs(pipeline, stages=stages)
    if needs:
        raise PreflightError(f"{where} needs a GPU ({', '.join(needs)}) and this machine has none "
                             f"({machine.describe()}); on a CPU box run {CPU_PIPELINE}, or override "
                             f"{' '.join(instead)}")


def _gpu_needs(pipeline: Pipeline, *, stages: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """What in the pipeline needs a GPU, and the overrides that would not."""
    needs, instead = [], []
    for stage in stages:
        precision = getattr(getattr(pipeline, stage, None), "precision", "auto")
        if precision in ("bf16", "fp16"):
            needs.append(f"{stage}.precision {precision}")
            instead.append(f"{stage}.precision=auto")
    if pipeline.accelerate_config and launch.wants_gpus(launch.read_config(pipeline.accelerate_config)):
        needs.append(f"accelerate_config {pipeline.accelerate_config}")
        instead.append("accelerate_config=accelerate/cpu2.yaml")
    return needs, instead


def plan_launch(pipeline: Pipeline, *, nproc: int | None, where: str, machine: Machine) -> launch.Launch | None:
    """Processes per machine: NPROC (--nproc), else the pipeline's `processes`, else the config file's
    `num_processes`, else one per visible GPU. More processes than GPUs is refused."""
    if nproc is not None and nproc < 1:
        raise ConfigError(f"NPROC (--nproc) must be at least 1, not {nproc}")
    if not pipeline.accelerate_config:
        if nproc not in (None, 1):
            raise ConfigError(f"NPROC={nproc} (--nproc) needs an accelerate_config in {where}, e.g. "
                              f"accelerate_config=accelerate/ddp.yaml; without one the stage runs in one process")
        return None
    file = pipeline.accelerate_config
    config = launch.read_config(file)
    machines = _count(config, "num_machines", file=file, default=1)
    on_gpus = config.get("use_cpu") is not True and machine.gpus > 0
    if nproc is not None:
        processes, reason = nproc, "NPROC"
    elif pipeline.processes is not None:
        processes, reason = pipeline.processes, f"processes in {where}"
    elif config.get("num_processes"):
        total = _count(config, "num_processes", file=file, default=1)
        if total % machines:
            raise ConfigError(f"accelerate_config file {file}: num_processes {total} is not a multiple of "
                              f"num_machines {machines}")
        processes, reason = total // machines, f"num_processes in {file}"
    elif on_gpus:
        processes, reason = machine.gpus, "one per visible GPU"
    else:
        processes, reason = 1, "no GPU visible"
    if on_gpus and processes > machine.gpus:
        raise ConfigError(f"{reason} asks for {processes} processes on this machine but it has "
                          f"{machine.describe()}; use NPROC={machine.gpus} or fewer (one process per GPU)")
    return launch.Launch(config_file=file, processes=processes, machines=machines, reason=reason)


def _count(config: dict, key: str, *, file: str, default: int) -> int:
    value = config.get(key) or default
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"accelerate_config file {file}: {key} must be a whole number of at least 1, got {value!r}")
    return value


# ---- data sets and models ---------------------------------------------------------------------------------

def stage_sources(pipeline: Pipeline, stages: tuple[str, ...]) -> list[tuple[str, DataSource]]:
    """(field, data set) for every data set the stages read."""
    found: list[tuple[str, DataSource | None]] = []
    for stage in stages:
        if stage == "collect":
            found.append(("rounds.prompts", pipeline.rounds.prompts) if pipeline.rounds.prompts else
                         ("ppo.dataset", pipeline.ppo.dataset if pipeline.ppo else None))
            continue
        section = getattr(pipeline, stage)
        if section is None:  # the stage itself says which section is missing
            continue
        for name in ("dataset", "eval_dataset", "eval_prompts"):
            if hasattr(section, name):
                found.append((f"{stage}.{name}", getattr(section, name)))
    unique = {(field, source.path): (field, source) for field, source in found if source is not None}
    return list(unique.values())


def stage_models(pipeline: Pipeline, stages: tuple[str, ...]) -> list[tuple[str, str]]:
    """(field, model) for every model the stages load from outside the registry."""
    found = []
    if "sft" in stages:
        found.append(("model", pipeline.model))
    if "rm" in stages and pipeline.rm is not None:
        if pipeline.rm.init == "base":
            found.append(("model", pipeline.model))
        elif pipeline.rm.init not in RM_INIT_NAMES and not is_entry_id(pipeline.rm.init):
            found.append(("rm.init", pipeline.rm.init))
    return [(field, model) for field, model in found if model != "tiny"]


def check_sources(pipeline: Pipeline, *, stages: tuple[str, ...], where: str, hub: Hub | None = None) -> list[str]:
    """One line per data set or model that does not resolve (`hub`: shared between calls, so that an unreachable
    hub is waited for once)."""
    from rlhf.pipeline.data import is_local  # imports datasets (about a second), not torch

    hub = hub or Hub(timeout=HUB_TIMEOUT_S)
    problems = []
    for field, source in stage_sources(pipeline, stages):
        if is_local(source.path):
            if not os.path.isfile(os.path.expanduser(source.path)):
                problems.append(f"{where}: {field}: data file {source.path} not found")
        else:
            problems.append(hub.check(source.path, kind="dataset", revision=source.revision, field=field,
                                      where=where))
    for field, model in stage_models(pipeline, stages):
        problems.append(_check_model(model, field=field, where=where, hub=hub))
    return [p for p in problems if p]


def _check_model(model: str, *, field: str, where: str, hub: Hub) -> str | None:
    folder = os.path.expanduser(model)
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            return f"{where}: {field}: model folder {model} has no config.json (not a Hugging Face model folder)"
        return None
    if model.startswith((".", "/", "~")) or ".." in model or not HUB_ID.match(model):
        return (f"{where}: {field}: model '{model}' is neither 'tiny', an existing model folder, "
                f"nor a hub id like Qwen/Qwen2.5-0.5B")
    return hub.check(model, kind="model", revision=None, field=field, where=where)


@dataclass
class Hub:
    """The hub as one pre-flight sees it: after one failed connection, later checks go to the cache alone."""

    timeout: float
    unreachable: str | None = None  # why the first failed request failed
    seen: set = dataclasses.field(default_factory=set)  # repositories checked (train and eval splits share one)

    def check(self, repo_id: str, *, kind: str, revision: str | None, field: str, where: str) -> str | None:
        """None when `repo_id` (a `dataset` or `model`) is cached or on the hub; else one line saying why not."""
        import huggingface_hub

        if (kind, repo_id, revision) in self.seen:
            return None
        self.seen.add((kind, repo_id, revision))
        what = f"{where}: {field}: hub {'data set' if kind == 'dataset' else 'model'} '{repo_id}'"
        if kind == "dataset":
            cached, offline = _dataset_cached(repo_id), huggingface_hub.is_offline_mode() or _datasets_offline()
            local_copy, fetch = f"give {field} a local .jsonl/.parquet copy", "load it once with network to cache it"
        else:
            cached, offline = _model_cached(repo_id), huggingface_hub.is_offline_mode()
            local_copy, fetch = f"set {field} to a local model folder", f"`hf download {repo_id}` with network"
        if cached:
            return None  # the loaders use the cache when the hub cannot be reached (slowly, unless offline)
        if offline:
            return (f"{what} is not in the local cache and the hub is offline (HF_HUB_OFFLINE=1): {fetch}, "
                    f"or {local_copy}")
        missing = self._ask(repo_id, kind=kind, revision=revision) if self.unreachable is None else None
        if missing:
            return f"{what} {missing}"
        if self.unreachable:
            return (f"{what} is not in the local cache and the hub cannot be reached ({self.unreachable}); "
                    f"with no network, {local_copy} and set HF_HUB_OFFLINE=1")
        return None

    def _ask(self, repo_id: str, *, kind: str, revision: str | None) -> str | None:
        """Ask the hub about the repository: what is wrong with it, or None; a hub that does not answer sets
        `unreachable` instead."""
        from huggingface_hub import HfApi, constants
        from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

        api = HfApi()
        try:
            (api.dataset_info if kind == "dataset" else api.model_info)(repo_id, revision=revision,
                                                                        timeout=self.timeout)
        except RevisionNotFoundError:
            return f"has no revision '{revision}' on the hub"
        except RepositoryNotFoundError:  # gated and private repositories land here too
            return (f"is not on the hub ({constants.ENDPOINT}), or it is private or gated: check the id, or set "
                    "HF_TOKEN to an account with access")
        except HFValidationError:
            return "is neither a local path nor a valid hub id"
        except Exception as err:  # noqa: BLE001 -- a hub that does not answer raises httpx, OSError and hub types
            self.unreachable = f"{constants.ENDPOINT}: {_first_line(err)}"
        return None


def _model_cached(repo_id: str) -> bool:
    from huggingface_hub import constants, try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=constants.HF_HUB_CACHE), str)


def _dataset_cached(repo_id: str) -> bool:
    """Where `datasets` looks when the hub cannot be reached (CachedDatasetModuleFactory in datasets/load.py):
    <HF_DATASETS_CACHE>/<namespace>___<snake_case name>/<config>/<version>/<hash>/."""
    from datasets import config
    from datasets.naming import camelcase_to_snakecase

    parts = repo_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = Path(config.HF_DATASETS_CACHE).expanduser() / "___".join(parts)
    return any(p.is_dir() for p in root.glob("*/*/*"))


def _datasets_offline() -> bool:
    from datasets import config

    return bool(config.HF_HUB_OFFLINE)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
