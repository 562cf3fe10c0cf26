"""``ParallelConfig``: the ``parallel`` group (``parallel=off|cfg``). Imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..errors import ConfigError


class ParallelKind(str, Enum):
    off = "off"
    cfg = "cfg"
    """Each of two processes (one GPU each) runs one half of classifier-free guidance's batch through
    the denoiser; the halves meet with one all-gather per step."""


@dataclass
class ParallelConfig:
    """How one request is spread over processes (``parallel.*``)."""

    kind: ParallelKind = ParallelKind.off
    world_size: int = 2
    """Processes taking part: guidance has two halves, so two."""
    rank: int = 0
    """This process's place; the command starts rank 1 itself (users leave it at 0)."""
    port: int = 0
    """Port of the rendezvous on 127.0.0.1; 0 takes a free one."""
    backend: str = "auto"
    """``auto``: NCCL on CUDA, gloo on the CPU."""
    timeout_s: int = 600
    """How long a process waits for the other at the rendezvous and at each exchange."""

    def validate(self, prefix: str = "parallel.") -> None:
        if ParallelKind(self.kind) == ParallelKind.off:
            return
        if self.world_size != 2:
            raise ConfigError(f"{prefix}world_size={self.world_size}: classifier-free guidance has two halves; use 2")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"{prefix}rank={self.rank} must be 0 or 1 (the command starts rank 1 itself)")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"{prefix}backend={self.backend!r} is not auto, gloo or nccl")
        if not 0 <= self.port < 65536 or self.timeout_s < 1:
            raise ConfigError(f"{prefix}port must be 0-65535 and timeout_s at least 1")

    @property
    def enabled(self) -> bool:
        return ParallelKind(self.kind) != ParallelKind.off
