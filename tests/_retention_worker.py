"""Saves epochs into a repository with a retention policy until killed (tests/repository/test_retention.py).

    python tests/_retention_worker.py <repo> <first epoch> <count>

Every checkpoint is a function of its epoch (``checkpoint(epoch)``), so the parent can check any
commit that survives a SIGKILL bit-exactly.
"""

from __future__ import annotations

import sys

import torch

from coral_torch import Repository
from coral_torch.retention import EveryNEpochs, LatestN

POLICY = LatestN(2) | EveryNEpochs(4)
OPTIMIZER = LatestN(1)


def checkpoint(epoch: int) -> dict:
    g = torch.Generator().manual_seed(1000)
    w = torch.randn(1 << 17, generator=g)
    step = torch.Generator().manual_seed(epoch)
    w += 1e-3 * epoch * torch.randn(1 << 17, generator=step)  # small changes: XOR deltas pay
    return {
        "state_dict": {"w": w, "frozen": torch.randn(4096, generator=g)},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(1 << 16, generator=step)}},
                              "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "epoch": epoch,
        "global_step": 10 * epoch,
    }


def main() -> None:
    repo = Repository(sys.argv[1])
    first, count = int(sys.argv[2]), int(sys.argv[3])
    for epoch in range(first, first + count):
        st = repo.commit(checkpoint(epoch), run="r", keep=POLICY, keep_optimizer=OPTIMIZER,
                         no_delta_prefixes=("optimizer_states/",))
        print("COMMITTED", epoch, st.commit_id, flush=True)


if __name__ == "__main__":
    main()
