"""How many processes `accelerate launch` starts (rlhf/pipeline/launch.py, decided by the pre-flight): one per
visible GPU unless NPROC or the pipeline's `processes` says otherwise, never more than the GPUs; and two "machines"
on this CPU box (two launchers on localhost, machine_rank 0 and 1, one process each) running PPO in sync."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.pipeline import launch, preflight
from rlhf.pipeline.config import load_pipeline
from rlhf.pipeline.preflight import Machine, PreflightError
from rlhf.pipeline.registry import Registry

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "pipelines" / "tiny.yaml"
CPU_BOX = Machine(gpus=0, visible_devices=None)


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the pipeline files name their data relative to the repository


def pipeline(*overrides: str):
    return load_pipeline(TINY, list(overrides))[0]


def no_launch(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("launched")

    monkeypatch.setattr(launch, "relaunch", fail)


@pytest.mark.parametrize("gpus, nproc, processes, expected, reason", [
    (1, None, None, 1, "one per visible GPU"),  # one GPU runs one process
    (2, None, None, 2, "one per visible GPU"),
    (8, None, None, 8, "one per visible GPU"),
    (8, 2, None, 2, "NPROC"),
    (8, None, 4, 4, "processes in tiny"),
    (8, 3, 4, 3, "NPROC"),  # the command line wins over the pipeline file
])
def test_the_process_count_follows_the_machine(gpus, nproc, processes, expected, reason):
    overrides = ["accelerate_config=accelerate/ddp.yaml"] + ([f"processes={processes}"] if processes else [])
    found = preflight.plan_launch(pipeline(*overrides), nproc=nproc, where="tiny",
                                  machine=Machine(gpus=gpus, visible_devices=None))
    assert (found.processes, found.total, found.reason) == (expected, expected, reason)


def test_more_processes_than_gpus_is_refused(capsys, monkeypatch):
    no_launch(monkeypatch)
    monkeypatch.setattr(preflight, "this_machine", lambda: Machine(gpus=2, visible_devices="0,1"))
    assert main(["sft", "--nproc", "4", "accelerate_config=accelerate/ddp.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: NPROC asks for 4 processes on this machine but it has 2 GPU(s) visible "
                   "(CUDA_VISIBLE_DEVICES=0,1); use NPROC=2 or fewer (one process per GPU)")
    with pytest.raises(PreflightError, match="processes in tiny asks for 3 processes"):
        preflight.run(pipeline("accelerate_config=accelerate/ddp.yaml", "processes=3"), command="sft", where="tiny",
                      nproc=None, machine=Machine(gpus=2, visible_devices=None))


def test_nproc_reaches_accelerate_as_num_processes(monkeypatch, capsys):
    """What `make sft NPROC=2` runs on a box with 4 GPUs: accelerate launch --num_processes 2, once."""
    calls = []
    monkeypatch.setattr(launch.subprocess, "call", lambda command, env: calls.append((command, env)) or 0)
    monkeypatch.setattr(preflight, "this_machine", lambda: Machine(gpus=4, visible_devices=None))
    assert main(["sft", "--nproc", "2", "accelerate_config=accelerate/ddp.yaml"]) == 0
    [(command, env)] = calls
    assert command[command.index("--num_processes") + 1] == "2" and env[launch.MARK] == "1"
    assert command[command.index("--config_file") + 1] == "accelerate/ddp.yaml"
    assert "launching 2 process(es) (NPROC)" in capsys.readouterr().out


def test_several_machines_count_processes_per_machine(tmp_path):
    """accelerate's --num_processes counts every machine's processes; NPROC and `processes` count one machine's."""
    config = tmp_path / "node.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_machines: 2\nmachine_rank: 1\nmain_process_ip: 10.0.0.1\n"
                      "main_process_port: 29500\nmixed_precision: bf16\n")
    found = preflight.plan_launch(pipeline(f"accelerate_config={config}"), nproc=None, where="tiny",
                                  machine=Machine(gpus=8, visible_devices=None))
    assert (found.processes, found.machines, found.total) == (8, 2, 16)


def test_nproc_without_an_accelerate_config_and_bad_counts_are_refused():
    with pytest.raises(PreflightError, match="needs an accelerate_config"):
        preflight.run(pipeline(), command="sft", where="tiny", nproc=2, machine=CPU_BOX)
    with pytest.raises(PreflightError, match="at least 1"):
        preflight.run(pipeline("accelerate_config=accelerate/cpu2.yaml"), command="sft", where="tiny", nproc=0,
                      machine=CPU_BOX)
    with pytest.raises(Exception, match="'processes' must be at least 1 and needs 'accelerate_config'"):
        pipeline("processes=2")


NODE_CONFIG = """# one of two "machines" on localhost: what scripts/slurm-multinode.sbatch writes on each node
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 2
machine_rank: {rank}
main_process_ip: 127.0.0.1
main_process_port: {port}
rdzv_backend: static
same_network: true
mixed_precision: "no"
"""


@pytest.mark.slow
def test_two_machines_on_one_host_run_ppo_in_sync(tmp_path, trained_parents):
    """Two `rlhf ppo` launchers, as on two nodes: each runs its own pre-flight and `accelerate launch` with
    machine_rank 0 or 1 and one process (NPROC=1); torchrun's static rendezvous joins them into one gloo group.
    The parents are the session's SFT and RM (tests/conftest.py), by id, in their registry."""
    registry = Registry(trained_parents["home"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides = [f"ppo.{k}={v}" for k, v in dict(sft_parent=trained_parents["sft"], rm_parent=trained_parents["rm"],
                                                 episodes=64, rollout_batch_size=16, mini_batch_size=8,
                                                 micro_batch_size=8, max_eval_prompts=16, save_steps=100).items()]
    env = {**os.environ, "RLHF_HOME": str(trained_parents["home"]), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launchers = []
    start = time.monotonic()
    for rank in (0, 1):
        config = tmp_path / f"node{rank}.yaml"
        config.write_text(NODE_CONFIG.format(rank=rank, port=port))
        command = [sys.executable, "-m", "rlhf.cli", "ppo", "--nproc", "1", "name=twonode",
                   f"accelerate_config={config}", *overrides]
        launchers.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in launchers]
    elapsed = time.monotonic() - start
    assert [p.returncode for p in launchers] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    assert all("launching 1 process(es) on each of 2 machines (NPROC)" in o for o in outputs)
    assert all("--num_processes 2" in o for o in outputs)
    [entry] = registry.entries(stage="ppo", pipeline="twonode")
    assert entry.status == "complete" and entry.metrics["train/processes"] == 2
    assert entry.metrics["train/processes_in_sync"] is True and entry.metrics["train/episodes"] == 64
    print(f"two launchers, 2 PPO steps: {elapsed:.1f} s")
