"""Who this process is under torchrun: rank, world size, local rank, and a barrier.

Extraction stages shard their row groups by rank (group k goes to rank k % world); each rank writes its
own finished shards and rank 0 joins them into the one table a single process would have written.
Without torchrun this is rank 0 of 1 and nothing is initialized.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, backend: str = "gloo") -> "Ranks":
        """Read torchrun's environment; join the process group if there are several processes.

        Extraction only needs barriers (gloo); training on GPUs passes ``nccl``.
        """
        ranks = cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))
        if ranks.world > 1 and not torch.distributed.is_initialized():
            if backend == "nccl":
                # Before the group exists: otherwise every rank's NCCL communicator (and its first
                # allocations) land on GPU 0, and barriers can hang.
                torch.cuda.set_device(ranks.local_rank)
            torch.distributed.init_process_group(backend)
        return ranks

    def owns(self, group: int) -> bool:
        return group % self.world == self.rank

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def device(self, device: str) -> str:
        """``cuda`` means this rank's own GPU when there are several processes."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world > 1 else device


def relaunch(processes: int, param: str) -> bool:
    """Start this script again under torchrun with ``processes`` local processes, if asked and not yet.

    Returns True when it did (the caller then has nothing left to do). Several machines: run
    ``torchrun --nnodes ... stages/<stage>.py ...`` yourself; the stage then sees torchrun's environment
    and does not relaunch.
    """
    if processes < 1:
        raise ValueError(f"{param}: must be at least 1, got {processes}")
    if processes == 1 or "LOCAL_RANK" in os.environ:
        return False
    from torch.distributed import run

    run.main(["--standalone", f"--nproc_per_node={processes}", sys.argv[0], *sys.argv[1:]])
    return True
