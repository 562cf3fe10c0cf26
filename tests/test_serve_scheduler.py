"""The serve scheduler's order of batches: FIFO, except that a replica prefers requests for the LoRA
weights it has fused, for at most ``lora_affinity_s`` of the oldest request's wait."""

from __future__ import annotations

import asyncio
import time

import pytest

from onediffx.serve.scheduler import BatchKey, Job, Scheduler

L1, L2 = (1.0, 0.0), (0.0, 1.0)


class Recorder:
    """A replica that runs nothing: it records the LoRA weights of each batch, switching like ``Replica``."""

    name = "recorder"

    def __init__(self) -> None:
        self.lora_weights = L1
        self.order: list[int] = []
        self.switches = 0

    def run(self, jobs: list[Job]) -> list[list[bytes]]:
        if jobs[0].key.loras != self.lora_weights:
            self.switches += 1
            self.lora_weights = jobs[0].key.loras
        self.order += [job.seeds[0] for job in jobs]
        return [[b""] for _ in jobs]


async def _serve(affinity_s: float, age_s: float = 0.0) -> Recorder:
    """Eight requests alternating two LoRAs, all queued before the one replica starts."""
    loop = asyncio.get_running_loop()
    scheduler = Scheduler(max_batch=1, batch_wait_s=0.0, queue_limit=64, lora_affinity_s=affinity_s)
    jobs = [Job(BatchKey(64, 64, 2, 5.0, (L1, L2)[i % 2], 1, False), "p", None, [i], loop, loop.create_future())
            for i in range(8)]
    for job in jobs:
        scheduler.submit(job)
    await asyncio.sleep(age_s)
    recorder = Recorder()
    scheduler.start([recorder])
    await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), 30)
    scheduler.stop()
    return recorder


def test_fifo_without_affinity_switches_at_every_batch():
    recorder = asyncio.run(_serve(affinity_s=0.0))
    assert recorder.order == list(range(8)) and recorder.switches == 7


def test_affinity_serves_the_fused_loras_first_and_switches_once():
    recorder = asyncio.run(_serve(affinity_s=30.0))
    assert recorder.order == [0, 2, 4, 6, 1, 3, 5, 7] and recorder.switches == 1


def test_affinity_gives_way_to_a_request_that_waited_its_bound():
    start = time.monotonic()
    recorder = asyncio.run(_serve(affinity_s=0.05, age_s=0.2))  # every request is older than the bound
    assert recorder.order == list(range(8)) and recorder.switches == 7
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("value", [-1, 700_000])
def test_lora_affinity_out_of_range_is_one_line(value, tmp_path):
    from conftest import run_cli

    proc = run_cli("serve", f"serve.lora_affinity_ms={value}", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"serve.lora_affinity_ms: {value}" in proc.stderr and "0 to 600000 ms" in proc.stderr, proc.stderr
