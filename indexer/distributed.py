"""torch.distributed for the build: which shards are mine, and waiting for the others.

Under ``torchrun`` (RANK and WORLD_SIZE in the environment) the build joins a
process group, gloo on the CPU and nccl where CUDA is; alone it is a world of
one and every call here is free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def owns(self, shard_index: int) -> bool:
        """Shards go round-robin, so every rank gets a share of any corpus."""
        return shard_index % self.size == self.rank

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def device(self, requested: str | None) -> str | None:
        """Under torchrun with CUDA, each rank takes its local GPU."""
        if self.size > 1 and requested in (None, "auto") and torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', self.rank)) % torch.cuda.device_count()}"
        return requested


def join() -> World:
    """The world this process is in: torchrun's, or a world of one."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size())


def leave(world: World) -> None:
    if world.size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
