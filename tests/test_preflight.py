"""The pre-flight (rlhf/pipeline/preflight.py): each bad input of issue #14 stops before anything is launched,
with one line per problem and exit 2; an unreachable wandb server means offline logging, never a failed stage."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import huggingface_hub
import pytest

from rlhf.cli import main
from rlhf.pipeline import launch, preflight, tracking
from rlhf.pipeline.config import load_pipeline
from rlhf.pipeline.preflight import Machine, PreflightError
from rlhf.pipeline.registry import Registry

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "pipelines" / "tiny.yaml"
GPU_PIPELINE = REPO / "pipelines" / "qwen2.5-0.5b-tldr.yaml"
CPU_BOX = Machine(gpus=0, visible_devices=None)


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the pipeline files name their data relative to the repository


@pytest.fixture
def restore_environment():
    """The pre-flight switches wandb to offline in os.environ, for the processes it starts; undo it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def refused_url() -> str:
    """A local port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_url():
    """A server that accepts connections (into the kernel's backlog) and never answers: a request times out."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def pipeline(*overrides: str, file: Path = TINY):
    return load_pipeline(file, list(overrides))[0]


def no_launch(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("launched")

    monkeypatch.setattr(launch, "relaunch", fail)


# ---- a GPU pipeline on a CPU box --------------------------------------------------------------------------

def test_gpu_pipeline_on_a_cpu_box_stops_with_one_line_naming_the_tiny_pipeline(capsys, monkeypatch):
    no_launch(monkeypatch)
    monkeypatch.setattr(preflight, "this_machine", lambda: CPU_BOX)
    assert main(["sft", "--pipeline", str(GPU_PIPELINE)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "needs a GPU (sft.precision bf16, accelerate_config accelerate/ddp.yaml)" in err
    assert "pipelines/tiny.yaml" in err


def test_the_console_script_stops_before_launching_without_a_traceback():
    """On this CPU machine, for real: no accelerate, no hub, a few seconds (the issue measured 67 s and 8 copies
    of a hub error followed by a torch elastic traceback)."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "ppo", "--pipeline", str(GPU_PIPELINE)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "pipelines/tiny.yaml" in done.stderr
    assert "launching" not in done.stdout
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("overrides, needs", [
    (["sft.precision=bf16"], "sft.precision bf16"),
    (["accelerate_config=accelerate/zero3.yaml"], "accelerate_config accelerate/zero3.yaml"),
])
def test_each_gpu_need_is_named(overrides, needs):
    with pytest.raises(PreflightError, match="needs a GPU") as err:
        preflight.run(pipeline(*overrides), command="sft", where="tiny", nproc=None, machine=CPU_BOX)
    assert needs in str(err.value)


def test_precision_auto_and_the_cpu_accelerate_config_run_on_a_cpu_box():
    assert preflight.run(pipeline(), command="sft", where="tiny", nproc=None, machine=CPU_BOX) is None
    found = preflight.run(pipeline("accelerate_config=accelerate/cpu2.yaml"), command="ppo", where="tiny", nproc=None,
                          machine=CPU_BOX)
    assert (found.processes, found.machines, found.reason) == (2, 1, "num_processes in accelerate/cpu2.yaml")
    # A stage that runs elsewhere is not held to another stage's precision.
    assert preflight.run(pipeline("ppo.precision=bf16"), command="sft", where="tiny", nproc=None,
                         machine=CPU_BOX) is None


def test_a_missing_accelerate_config_file_is_one_line(capsys, monkeypatch):
    no_launch(monkeypatch)
    assert main(["sft", "accelerate_config=accelerate/nope.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "accelerate_config file accelerate/nope.yaml not found" in err


# ---- data sets and models ---------------------------------------------------------------------------------

def test_hub_data_and_model_not_cached_while_offline(capsys, monkeypatch):
    """HF_HUB_OFFLINE=1 (set for every test): say so, and name a local copy. Both problems, one line each."""
    no_launch(monkeypatch)
    args = ["sft", "sft.dataset=some-org/absent-data", "model=some-org/absent-model"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 problems, nothing was started:")
    lines = err.strip().splitlines()[1:]
    assert len(lines) == 2
    assert "sft.dataset: hub data set 'some-org/absent-data' is not in the local cache and the hub is offline " \
           "(HF_HUB_OFFLINE=1)" in lines[0] and "local .jsonl/.parquet copy" in lines[0]
    assert "model: hub model 'some-org/absent-model' is not in the local cache" in lines[1]
    assert "hf download some-org/absent-model" in lines[1] and "local model folder" in lines[1]


def test_cached_hub_data_and_model_pass_offline(tmp_path, monkeypatch):
    hub_cache, data_cache = tmp_path / "hub", tmp_path / "datasets"
    snapshot = hub_cache / "models--some-org--cached-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (hub_cache / "models--some-org--cached-model" / "refs").mkdir()
    (hub_cache / "models--some-org--cached-model" / "refs" / "main").write_text("abc123")
    (data_cache / "some-org___cached_data" / "default" / "0.0.0" / "f00d").mkdir(parents=True)  # datasets' layout
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", data_cache)
    found = pipeline("sft.dataset=some-org/CachedData", "model=some-org/cached-model")
    assert preflight.check_sources(found, stages=("sft",), where="tiny") == []


def test_an_unreachable_hub_is_named_with_hf_hub_offline(refused_url, monkeypatch):
    """No network and no offline mode: the first request fails, the others go to the cache without waiting."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", refused_url)
    found = pipeline("sft.dataset=some-org/absent-data", "model=some-org/absent-model")
    problems = preflight.check_sources(found, stages=("sft",), where="tiny")
    assert len(problems) == 2
    assert all(f"the hub cannot be reached ({refused_url}" in p and "HF_HUB_OFFLINE=1" in p for p in problems)


def test_a_hub_that_never_answers_times_out_quickly(silent_url, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", silent_url)
    monkeypatch.setattr(preflight, "HUB_TIMEOUT_S", 1.0)
    start = time.monotonic()
    problems = preflight.check_sources(pipeline("sft.eval_dataset=some-org/absent-data",
                                                "sft.dataset=some-org/absent-data"), stages=("sft",), where="tiny")
    assert time.monotonic() - start < 5
    [problem] = problems  # one repository, one line, though two fields name it
    assert "sft.dataset" in problem and "cannot be reached" in problem


def test_local_paths_that_do_not_exist():
    found = pipeline("ppo.dataset=data/tiny/absent.jsonl", "ppo.eval_prompts=data/tiny/prompts.jsonl")
    assert preflight.check_sources(found, stages=("ppo",), where="tiny") == [
        "tiny: ppo.dataset: data file data/tiny/absent.jsonl not found"]
    found = pipeline("model=./no-such-model")
    [problem] = preflight.check_sources(found, stages=("sft",), where="tiny")
    assert "model './no-such-model' is neither 'tiny', an existing model folder, nor a hub id" in problem
    assert preflight.check_sources(found, stages=("ppo",), where="tiny") == []  # PPO loads its models from the registry


# ---- tracking ---------------------------------------------------------------------------------------------

def online_with_key(monkeypatch, url: str) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.delenv("WANDB_MODE")  # conftest disables wandb


def probes(monkeypatch) -> list[float]:
    """The timeout of each request the wandb check makes, each still sent for real. How long the requests took
    is the kernel's business and, on a busy machine, not a bound a test can hold; how many were made, with what
    timeout, is this code's."""
    seen, real = [], tracking.urllib.request.urlopen

    def spy(url, *, timeout):
        seen.append(timeout)
        return real(url, timeout=timeout)

    monkeypatch.setattr(tracking.urllib.request, "urlopen", spy)
    return seen


def test_an_unreachable_wandb_server_means_offline(refused_url, monkeypatch, restore_environment):
    online_with_key(monkeypatch, refused_url)
    seen = probes(monkeypatch)
    reason = tracking.check_server()
    assert seen == [tracking.PROBE_TIMEOUT_S]  # one request, not retried: a refusal is final
    assert reason.startswith(refused_url) and "refused" in reason.lower()
    assert tracking.wandb_mode() == "offline" and os.environ[tracking.UNREACHABLE] == reason


def test_a_wandb_server_that_never_answers_times_out_quickly(silent_url, monkeypatch, restore_environment):
    online_with_key(monkeypatch, silent_url)
    seen = probes(monkeypatch)
    reason = tracking.check_server(timeout=1.0)
    assert seen == [1.0]  # the caller's timeout bounds the one request; the message says it was reached
    assert reason == f"{silent_url}: no answer within 1 s" and tracking.wandb_mode() == "offline"


@pytest.mark.slow
def test_start_run_falls_back_to_offline_by_itself(refused_url, monkeypatch, restore_environment, tmp_path, capsys):
    """Without the pre-flight (a stage called from Python): wandb.init online gives up after INIT_TIMEOUT_S and the
    run goes on offline, with the sync command."""
    online_with_key(monkeypatch, refused_url)
    monkeypatch.setattr(tracking, "INIT_TIMEOUT_S", 2.0)
    start = time.monotonic()
    run_id = tracking.start_run(project="p", group="g", job_type="sft", name="n", config={}, folder=tmp_path)
    elapsed = time.monotonic() - start
    tracking.finish()
    assert run_id and elapsed < 15
    [line] = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert line.startswith(f"sft: warning: wandb cannot reach its server ({refused_url}")
    assert f"upload later with: wandb sync {tmp_path}" in line and "offline-run-" in line


def test_a_failing_wandb_call_is_one_warning_and_never_an_error(monkeypatch, restore_environment, tmp_path, capsys):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    tracking.start_run(project="p", group="g", job_type="ppo", name="n", config={}, folder=tmp_path)

    def broken(*args, **kwargs):
        raise wandb.errors.CommError("the service went away")

    monkeypatch.setattr(wandb, "log", broken)
    tracking.log({"a": 1.0}, step=1)
    tracking.log_table("samples", columns=["x"], rows=[["y"]], step=1)
    tracking.log_summary({"a": 1.0})
    finish = wandb.finish
    monkeypatch.setattr(wandb, "finish", broken)
    tracking.finish()
    finish()  # leave no run open for the next test
    [line] = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert line.startswith("ppo: warning: wandb log failed (the service went away); wandb is off for the rest")
    assert "wandb sync" in line


@pytest.mark.slow
def test_a_stage_with_a_key_and_no_wandb_server_trains_and_logs_offline(refused_url, monkeypatch,
                                                                      restore_environment, registry_home, capsys):
    """The issue's firewalled cluster: WANDB_API_KEY set, the server unreachable. The stage completes, wandb logs
    offline, and one warning gives the `wandb sync` command."""
    online_with_key(monkeypatch, refused_url)
    start = time.monotonic()
    assert main(["sft", "sft.max_steps=2", "sft.eval_fraction=0.05"]) == 0
    elapsed = time.monotonic() - start
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if "warning" in line]
    assert "wandb cannot reach its server" in line and "upload later with: wandb sync " in line
    sync_dir = Path(line.split("wandb sync ")[1])
    assert sync_dir.name.startswith("offline-run-") and any(sync_dir.glob("*.wandb"))
    [entry] = Registry(registry_home).entries(stage="sft")
    assert entry.status == "complete"
    print(f"sft with an unreachable wandb server: {elapsed:.1f} s")
