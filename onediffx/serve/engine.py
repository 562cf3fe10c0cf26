"""``LocalEngine``: the replicas of one process, their loading, and the scheduler in front of them.

The HTTP app talks to an engine only (``ready``, ``submit``, ``cancel``, the LoRA stack and the
limits), so the same app runs in one process with N GPUs here and inside each Ray Serve replica.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from omegaconf import DictConfig

from ..errors import OnediffxError
from ..generate import Settings
from .cost import cost_limits, with_free_memory
from .metrics import ServeMetrics
from .replicas import Replica, default_deepcache, lora_stack, replica_devices
from .scheduler import Scheduler
from .schemas import Limits

log = logging.getLogger("onediffx.serve")


def limits_of(cfg: DictConfig) -> Limits:
    run = Settings.from_config(cfg)  # a request without size, steps or guidance gets the run's
    return Limits(max_n=cfg.serve.max_batch, max_steps=cfg.serve.max_steps, max_size=cfg.serve.max_size,
                  max_prompt_chars=cfg.serve.max_prompt_chars, default_size=f"{run.width}x{run.height}",
                  default_steps=min(run.steps, cfg.serve.max_steps), default_guidance=float(run.guidance))


class LocalEngine:
    """Replicas on this machine's devices behind one ``Scheduler``."""

    def __init__(self, cfg: DictConfig, devices: Optional[list[str]] = None) -> None:
        self.cfg = cfg
        self.devices = devices if devices is not None else replica_devices(cfg)
        self.limits = limits_of(cfg)
        self.cost = cost_limits(cfg)
        """Checked per request before it is queued; the memory part is filled in once the pipelines are warm."""
        self.lora_keys, _, self.lora_defaults = lora_stack(cfg)
        self.default_deepcache = default_deepcache(cfg)
        self.model_id = cfg.serve.model_id or cfg.model.name
        self.metrics = ServeMetrics(cfg.serve.max_batch, self.devices)
        self.metrics.replicas.set(len(self.devices))
        self.scheduler = Scheduler(cfg.serve.max_batch, cfg.serve.batch_wait_ms / 1000.0, cfg.serve.queue_limit,
                                   observer=self.metrics, lora_affinity_s=cfg.serve.lora_affinity_ms / 1000.0)
        self.metrics.busy.set_function(lambda: self.scheduler.busy)
        self.replicas = [Replica(cfg, device, i) for i, device in enumerate(self.devices)]
        for replica in self.replicas:
            replica.on_lora_switch = self.metrics.lora_switch
        self.ready = False
        self.error: Optional[BaseException] = None
        self.ready_seconds: Optional[float] = None
        self.on_ready: Optional[Callable[["LocalEngine"], None]] = None
        self.on_failure: Optional[Callable[[BaseException], None]] = None
        self._loader: Optional[threading.Thread] = None

    def start(self) -> None:
        """Assemble the replicas in the background; ``ready`` turns true when all are warm."""
        self._loader = threading.Thread(target=self._load, name="onediffx-load", daemon=True)
        self._loader.start()

    def load(self) -> None:
        """Assemble the replicas in this thread (Ray replicas, tests)."""
        self._load()
        if self.error is not None:
            raise self.error

    def _load(self) -> None:
        start = time.perf_counter()
        try:
            for replica in self.replicas:
                replica.load()
        except BaseException as err:  # noqa: BLE001 - reported by /readyz and the command's exit
            if not isinstance(err, OnediffxError):
                log.exception("loading the pipeline failed")
            self.error = err
            if self.on_failure:
                self.on_failure(err)
            return
        self.cost = with_free_memory(self.cost, [r.asm.device for r in self.replicas], self.replicas[0].asm.dtype)
        self.scheduler.start(self.replicas)
        self.ready_seconds = time.perf_counter() - start
        self.metrics.weights_loaded_time.set(max(r.weights_loaded_at or 0.0 for r in self.replicas))
        self.metrics.ready_time.set(time.time())
        self.ready = True
        self.metrics.ready.set(1)
        if self.on_ready:
            self.on_ready(self)

    def stop(self) -> None:
        """Finish what is queued and running, then release the pipelines."""
        if self._loader is not None:
            self._loader.join()
        self.scheduler.stop()
        for replica in self.replicas:
            replica.close()
