"""Who this process is under torchrun: rank, world size, local rank, and a barrier.

Extraction stages shard their row groups by rank (group k goes to rank k % world); each rank writes its
own finished shards and rank 0 joins them into the one table a single process would have written.
Without torchrun this is rank 0 of 1 and nothing is initialized.
"""

from __future__ import annotations

import os
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
