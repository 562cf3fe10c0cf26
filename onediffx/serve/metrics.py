"""The server's Prometheus metrics (``GET /metrics``), one registry per server.

Latency, queue depth, batch sizes, images, requests by status, dropped requests, LoRA switches,
and the memory each GPU replica holds, read from torch at scrape time.
"""

from __future__ import annotations

from typing import Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .scheduler import Job

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 300)


class GpuMemory(Collector):
    """``onediffx_gpu_memory_bytes{device,kind}``: what torch holds on each replica's GPU."""

    def __init__(self, devices: Iterable[str]) -> None:
        self.devices = sorted({d for d in devices if d.startswith("cuda")})

    def collect(self):
        family = GaugeMetricFamily("onediffx_gpu_memory_bytes", "GPU memory torch holds, per replica device",
                                   labels=["device", "kind"])
        if self.devices:
            import torch

            for device in self.devices:
                family.add_metric([device, "allocated"], torch.cuda.memory_allocated(device))
                family.add_metric([device, "reserved"], torch.cuda.memory_reserved(device))
                family.add_metric([device, "peak_allocated"], torch.cuda.max_memory_allocated(device))
        yield family


class ServeMetrics:
    """The metrics, and the scheduler's ``Observer`` that feeds them."""

    def __init__(self, max_batch: int, devices: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.latency = Histogram("onediffx_request_seconds", "Time from request received to response ready",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("onediffx_requests", "Image requests answered, by HTTP status", ["status"], registry=r)
        self.images = Counter("onediffx_images", "Images returned", registry=r)
        self.dropped = Counter("onediffx_dropped_requests", "Requests dropped before their batch ran",
                               ["reason"], registry=r)
        self.queue_depth = Gauge("onediffx_queue_depth", "Requests waiting for a replica", registry=r)
        self.batch_size = Histogram("onediffx_batch_size", "Images per pipeline call (padding excluded)",
                                    buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.batch_requests = Histogram("onediffx_batch_requests", "Requests per pipeline call",
                                        buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.batch_seconds = Histogram("onediffx_batch_seconds", "Seconds of one pipeline call", ["replica"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_errors = Counter("onediffx_batch_errors", "Pipeline calls that raised", ["replica"], registry=r)
        self.lora_switches = Counter("onediffx_lora_switches", "LoRA weight switches between batches", registry=r)
        self.lora_switch_seconds = Histogram("onediffx_lora_switch_seconds", "Seconds of one LoRA switch",
                                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.ready = Gauge("onediffx_ready", "1 once every replica is assembled and warm", registry=r)
        self.weights_loaded_time = Gauge("onediffx_weights_loaded_time_seconds",
                                         "Unix time the last replica had its model weights loaded", registry=r)
        self.ready_time = Gauge("onediffx_ready_time_seconds", "Unix time the server turned ready", registry=r)
        self.busy = Gauge("onediffx_replicas_busy", "Replicas running a batch now", registry=r)
        self.replicas = Gauge("onediffx_replicas", "Replicas (pipelines) behind the endpoint", registry=r)
        r.register(GpuMemory(devices))

    # --- Observer ---

    def queued(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def batch(self, replica: str, jobs: list[Job], seconds: float, error: Optional[BaseException]) -> None:
        self.batch_seconds.labels(replica).observe(seconds)
        if error is not None:
            self.batch_errors.labels(replica).inc()
            return
        self.batch_size.observe(sum(j.images for j in jobs))
        self.batch_requests.observe(len(jobs))

    def lora_switch(self, seconds: float) -> None:
        self.lora_switches.inc()
        self.lora_switch_seconds.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
