"""What a PPO run reports, on tiny inputs: the cross-process weight check can say "out of sync" (and "not
applicable" for sharded weights), the per-phase timing adds up, and the time-left text.

    .venv/bin/python -m pytest -q tests/test_report.py
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from rlhf.core.timing import PhaseTimer, format_duration
from rlhf.training.ppo.report import processes_in_sync, weights_digest


class TwoProcesses:
    """Stands for an accelerator whose `gather` brings this process's value and another process's."""

    device = torch.device("cpu")

    def __init__(self, other: torch.nn.Module):
        self.other = other

    def gather(self, mine: torch.Tensor) -> torch.Tensor:
        return torch.cat([mine, torch.tensor([weights_digest(self.other)], dtype=torch.int64)])


def test_one_bit_in_one_weight_puts_the_processes_out_of_sync():
    torch.manual_seed(0)
    mine = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    theirs = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    theirs.load_state_dict(mine.state_dict())
    assert processes_in_sync(TwoProcesses(theirs), mine) is True
    with torch.no_grad():  # the smallest possible change: the next float after one weight
        theirs[1].weight[0, 0] = torch.nextafter(theirs[1].weight[0, 0], torch.tensor(10.0))
    assert processes_in_sync(TwoProcesses(theirs), mine) is False


def test_sharded_weights_are_one_copy_and_are_not_compared():
    """Under ZeRO-3 and FSDP2 the processes hold one copy of the weights between them: gathered, they are the same
    bytes everywhere, so a comparison could not fail and the check answers None (not applicable), never True."""
    mine = torch.nn.Linear(2, 2)
    for index, param in enumerate(mine.parameters()):
        param.ds_id = index  # how deepspeed marks the parameters it partitions (ZeRO-3)
    theirs = torch.nn.Linear(2, 2)  # other weights: a comparison would say False
    assert processes_in_sync(TwoProcesses(theirs), mine) is None


def test_the_digest_sees_what_a_sum_of_weights_would_not():
    mine = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        mine.weight.copy_(torch.tensor([[1.0, 2.0]]))
    swapped = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        swapped.weight.copy_(torch.tensor([[2.0, 1.0]]))  # the same sum, different weights
    assert weights_digest(mine) != weights_digest(swapped)
    assert weights_digest(mine) == weights_digest(mine)


def test_phase_timer_adds_phases_within_a_step_and_averages_steps():
    now = SimpleNamespace(t=0.0)
    timer = PhaseTimer(clock=lambda: now.t)
    timer.start_step()
    with timer.phase("generate"):
        now.t += 3.0
    with timer.phase("update"):
        now.t += 1.0
    with timer.phase("generate"):  # entered twice: added
        now.t += 0.5
    now.t += 0.5  # outside any phase: in the step, not in a phase
    assert timer.end_step() == 5.0 and timer.seconds == {"generate": 3.5, "update": 1.0}
    timer.start_step()
    now.t += 3.0
    timer.end_step()
    assert timer.mean_step_seconds() == 4.0


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.4, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]
