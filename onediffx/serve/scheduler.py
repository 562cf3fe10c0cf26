"""The bounded queue in front of the replicas, and how it forms batches.

Requests that share everything a pipeline call shares (shape, steps, guidance, LoRA weights,
DeepCache interval, whether a negative prompt is given) can run as one call: each image keeps its
own prompt and its own per-seed CPU generator, so it is the image the request would get alone. The
first request of a batch waits at most ``batch_wait_s`` for company; a free replica takes the
oldest waiting request's batch, so incompatible requests run in turn (FIFO), with one exception:
a replica prefers requests for the LoRA weights it has fused (a switch re-fuses every touched layer)
unless the oldest request has waited ``lora_affinity_s``, which bounds what the exception costs it.

Workers are threads (one per replica, each owning its pipeline); the event loop only enqueues and
awaits futures, so health, metrics and new requests are answered while a batch runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol


class QueueFull(Exception):
    """The queue holds ``queue_limit`` requests; the caller answers 429."""


class Stopped(Exception):
    """The scheduler no longer accepts requests (shutting down)."""


@dataclass(frozen=True)
class BatchKey:
    """What every request of one pipeline call must share."""

    height: int
    width: int
    steps: int
    guidance: float
    loras: tuple[float, ...]
    """The weight of each LoRA of the preloaded stack, in stack order."""
    deepcache: int
    negative: bool
    """Whether negative prompts are given (SDXL treats none and an empty one differently)."""


@dataclass(eq=False)
class Job:
    """One request: its images' prompts and seeds, and where its result goes."""

    key: BatchKey
    prompt: str
    negative_prompt: Optional[str]
    seeds: list[int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    progress: Optional[asyncio.Queue] = None
    """Streaming requests: denoising steps done, put here as they happen."""
    state: str = "new"

    @property
    def images(self) -> int:
        return len(self.seeds)

    def resolve(self, result: Any) -> None:
        self.loop.call_soon_threadsafe(_set_result, self.future, result)

    def fail(self, err: BaseException) -> None:
        self.loop.call_soon_threadsafe(_set_exception, self.future, err)

    def step(self, done: int) -> None:
        if self.progress is not None:
            self.loop.call_soon_threadsafe(self.progress.put_nowait, done)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)


class Runner(Protocol):
    """A replica: runs one batch of jobs on its pipeline, returns each job's images (PNG bytes)."""

    name: str
    lora_weights: tuple[float, ...]
    """The LoRA weights its pipeline has fused now (``BatchKey.loras`` of the batch that needs no switch)."""

    def run(self, jobs: list[Job]) -> list[list[bytes]]: ...


class Observer(Protocol):
    def queued(self, depth: int) -> None: ...

    def batch(self, replica: str, jobs: list[Job], seconds: float, error: Optional[BaseException]) -> None: ...


class Scheduler:
    """Bounded FIFO of jobs, batched per ``BatchKey``, served by one worker thread per replica."""

    def __init__(self, max_batch: int, batch_wait_s: float, queue_limit: int,
                 observer: Optional[Observer] = None, lora_affinity_s: float = 0.0) -> None:
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.lora_affinity_s = lora_affinity_s
        self.queue_limit = queue_limit
        self.observer = observer
        self._pending: deque[Job] = deque()
        self._claimed: dict[BatchKey, int] = {}
        """Keys a worker is collecting a batch for (other workers leave them alone)."""
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self.batch_seconds = 0.0
        """Moving average of one batch's time, for Retry-After."""

    # --- the event loop's side ---

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise Stopped()
            if len(self._pending) >= self.queue_limit:
                raise QueueFull()
            job.state = "queued"
            self._pending.append(job)
            self._cond.notify_all()
            depth = len(self._pending)
        if self.observer:
            self.observer.queued(depth)

    def cancel(self, job: Job) -> bool:
        """Take ``job`` out of the queue (client gone, timed out); False when it already runs or ran."""
        with self._cond:
            if job.state != "queued":
                return False
            self._pending.remove(job)
            job.state = "cancelled"
            self._cond.notify_all()
            depth = len(self._pending)
        if self.observer:
            self.observer.queued(depth)
        return True

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> int:
        return self._busy

    def retry_after_s(self, replicas: int) -> int:
        """A client's fair wait before retrying: the queue's batches spread over the replicas."""
        batches = max(1, len(self._pending) // max(1, self.max_batch))
        return max(1, int(round(batches * max(self.batch_seconds, 0.5) / max(1, replicas))))

    # --- the workers' side ---

    def start(self, runners: list[Runner]) -> None:
        for runner in runners:
            thread = threading.Thread(target=self._work, args=(runner,), name=f"onediffx-{runner.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish every queued job, then end the workers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _first(self, runner: Runner) -> Optional[Job]:
        """The job whose batch ``runner`` takes next: the oldest one not being collected by another
        worker, or, while that one has waited less than ``lora_affinity_s``, the oldest with the
        LoRA weights ``runner`` has fused."""
        free = (j for j in self._pending if j.key not in self._claimed)
        oldest = next(free, None)
        current = getattr(runner, "lora_weights", None)
        if oldest is None or current is None or oldest.key.loras == current or \
                time.monotonic() - oldest.enqueued >= self.lora_affinity_s:
            return oldest
        return next((j for j in free if j.key.loras == current), oldest)

    def _take(self, runner: Runner) -> Optional[list[Job]]:
        with self._cond:
            while True:
                first = self._first(runner)
                if first is None:
                    if self._stopping and not self._pending:
                        return None
                    self._cond.wait()
                    continue
                key = first.key
                self._claimed[key] = self._claimed.get(key, 0) + 1
                try:
                    deadline = first.enqueued + self.batch_wait_s
                    while True:
                        batch = self._select(key)
                        now = time.monotonic()
                        if not batch or sum(j.images for j in batch) >= self.max_batch or now >= deadline \
                                or self._stopping:
                            break
                        self._cond.wait(deadline - now)
                finally:
                    self._claimed[key] -= 1
                    if not self._claimed[key]:
                        del self._claimed[key]
                if not batch:  # cancelled while we waited
                    continue
                for job in batch:
                    self._pending.remove(job)
                    job.state = "running"
                self._busy += 1
                self._cond.notify_all()
                depth = len(self._pending)
                break
        if self.observer:
            self.observer.queued(depth)
        return batch

    def _select(self, key: BatchKey) -> list[Job]:
        """The oldest jobs of ``key`` whose images fit in one call."""
        batch, images = [], 0
        for job in self._pending:
            if job.key == key and images + job.images <= self.max_batch:
                batch.append(job)
                images += job.images
        return batch

    def _work(self, runner: Runner) -> None:
        while True:
            batch = self._take(runner)
            if batch is None:
                return
            start = time.perf_counter()
            error: Optional[BaseException] = None
            try:
                results = runner.run(batch)
            except BaseException as err:  # noqa: BLE001 - one batch's failure fails its requests only
                error = err
                for job in batch:
                    job.fail(err)
            else:
                for job, images in zip(batch, results):
                    job.resolve(images)
            finally:
                seconds = time.perf_counter() - start
                with self._cond:
                    self._busy -= 1
                    for job in batch:
                        job.state = "done"
                    self.batch_seconds = seconds if not self.batch_seconds else 0.8 * self.batch_seconds + 0.2 * seconds
                if self.observer:
                    self.observer.batch(runner.name, batch, seconds, error)


