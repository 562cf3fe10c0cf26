"""The ``serve`` scenario: ``onediffx serve`` against a plain diffusers FastAPI server, over HTTP.

Both servers run as subprocesses on this machine with the same model, the same two seeded LoRA
files and the same fixed request mix (two sizes, two LoRAs, one image per request). Each is driven
closed-loop at each of ``bench.serve_concurrency`` clients, then open-loop (Poisson arrivals) at
80% of the best throughput it reached; rows give images/s, p50/p99 latency and, for onediffx, the
mean batch size and LoRA switches read from ``/metrics``. onediffx starts twice, cold (compiles and
saves its graphs) and warm (loads them): the time from process start to ``/readyz`` is a row of its
own. The peer (``peer_server``) compiles the UNet with ``torch.compile`` and answers one request at
a time; it is warmed on every size and LoRA of the mix before it says ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from itertools import count
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from omegaconf import DictConfig

from ..client import AsyncClient, Client
from ..errors import ConfigError
from ..generate import Settings

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)
PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red fox in the snow, golden hour",
           "a watercolor of a lighthouse", "a bowl of ramen, studio lighting"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sizes(cfg: DictConfig) -> list[tuple[int, int]]:
    """(height, width): the run's size and (``bench.serve_sizes=2``) a landscape one three quarters as tall."""
    run = Settings.from_config(cfg)
    height, width = run.height, run.width
    return [(height, width), (max(8, height * 3 // 4 // 8 * 8), width)][:cfg.bench.serve_sizes]


def _loras(cfg: DictConfig, folder: Path) -> dict[str, Path]:
    """Two seeded rank-8 LoRAs (UNet attention or transformer blocks, text encoders) for this model, and their conf entries."""
    import torch

    from ..lora.synthetic import lora_targets, random_lora, save_published

    if cfg.model.builtin:
        from ..models.tiny import build_tiny

        pipe = build_tiny(cfg.model.builtin)
    elif cfg.model.synthetic:
        from ..models.synthetic import build_synthetic

        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = build_synthetic(cfg.model.arch, device, torch.float16 if device == "cuda" else torch.float32)
    else:
        raise ConfigError("bench.scenarios: serve needs model.synthetic=true or a built-in model (seeded LoRAs)")
    targets = {k: m for k, m in lora_targets(pipe, conv=False).items() if k[0] != "unet" or "attentions." in k[1]}
    files = {}
    (folder / "conf" / "lora").mkdir(parents=True)
    for i, name in enumerate(("l1", "l2")):
        path = save_published(pipe, random_lora(targets, 8, seed=200 + i), folder / f"{name}.safetensors")
        (folder / "conf" / "lora" / f"{name}.yaml").write_text(f"# @package lora.{name}\nsource: {path}\nscale: 1.0\n")
        files[name] = path
    del pipe, targets
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return files


def request_mix(cfg: DictConfig, count_: int, start: int = 0) -> list[dict[str, Any]]:
    """The fixed mix: sizes and LoRAs alternate so that every batch key recurs."""
    sizes, steps = _sizes(cfg), Settings.from_config(cfg).steps
    out = []
    for i in range(start, start + count_):
        height, width = sizes[i % len(sizes)]
        out.append({"prompt": PROMPTS[i % len(PROMPTS)], "size": f"{width}x{height}", "steps": steps,
                    "seed": i, "loras": {("l1", "l2")[(i // 2) % 2]: 1.0}})
    return out


class _Process:
    def __init__(self, label: str, cmd: list[str], env: dict[str, str], log: Path, port: int) -> None:
        self.label, self.log, self.url = label, log, f"http://127.0.0.1:{port}"
        self.started = time.perf_counter()
        with log.open("w") as f:
            self.proc = subprocess.Popen(cmd, env=env, cwd=log.parent, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        with Client(self.url) as client:
            deadline = time.perf_counter() + timeout
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.label} exited ({self.proc.returncode}): {self.tail()}")
                try:
                    if client.http.get("/readyz", timeout=5).status_code == 200:
                        return time.perf_counter() - self.started
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"{self.label} not ready within {timeout} s: {self.tail()}")

    def tail(self) -> str:
        lines = [l for l in self.log.read_text(errors="replace").splitlines() if l.strip()]
        return " | ".join(lines[-3:])

    def stop(self) -> Optional[int]:
        return _stop_all([self])[0]


STOP_GRACE_S = 120
"""How long stopped servers get to drain before SIGKILL (a server still compiling finishes the graph first)."""


def _stop_all(processes: list[_Process]) -> list[Optional[int]]:
    """SIGTERM to every server at once, then one shared grace period: stopped one by one, three
    servers still compiling took up to three grace periods, past a bounded job's time limit."""
    for p in processes:
        if p.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # exited since the poll
                os.killpg(p.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in processes:
        try:
            p.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.proc.pid, signal.SIGKILL)
    return [p.proc.wait() for p in processes]


def _env(inductor: Path) -> dict[str, str]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    for key in ("ONEDIFFX_FULL_ERROR", "HYDRA_FULL_ERROR"):
        env.pop(key, None)
    return env


def _onediffx(cfg: DictConfig, work: Path, label: str, sizes: Optional[list[tuple[int, int]]] = None) -> _Process:
    """An ``onediffx serve`` process warming ``sizes`` (default: every size of the mix); the graph
    cache key does not depend on them, so processes warming other sizes fill one cache."""
    port = _free_port()
    model = cfg.model
    sizes = sizes or _sizes(cfg)
    compiled = cfg.compile.backend != "none"
    most = cfg.bench.serve_max_batch
    batch_sizes = sorted({b for b in (1, 2, 4, 8, 16) if b < most} | {most}) if compiled else []
    shapes = ",".join(f"{{height:{h},width:{w},batch:1}}" for h, w in sizes)
    cmd = [sys.executable, "-m", "onediffx", "serve", f"model={model.name}",
           f"model.synthetic={str(model.synthetic).lower()}", f"compile={cfg.bench.compile_preset}",
           f"height={sizes[0][0]}", f"width={sizes[0][1]}", f"steps={Settings.from_config(cfg).steps}",
           f"cache.dir={cfg.bench.serve_cache or work / 'graphs'}", f"hydra.searchpath=[file://{work / 'conf'}]", "lora=[l1,l2]",
           f"warmup.shapes=[{shapes}]", "warmup.on_cache_hit=run", f"serve.port={port}",
           f"serve.max_batch={cfg.bench.serve_max_batch}", f"serve.batch_sizes=[{','.join(map(str, batch_sizes))}]",
           "serve.queue_limit=1024", "serve.request_timeout_s=1800", f"device={cfg.device}",
           "startup_report=true"]  # the kept log says where the seconds to ready went
    return _Process(label, cmd, _env(work / "inductor-onediffx"), work / f"{label.replace(' ', '-')}.log", port)


def _peer(cfg: DictConfig, work: Path, files: dict[str, Path]) -> _Process:
    port = _free_port()
    model = cfg.model
    source = ["--builtin", model.builtin] if model.builtin else ["--arch", model.arch]
    warm = [{"size": f"{w}x{h}", "loras": {name: 1.0}} for h, w in _sizes(cfg) for name in files]
    cmd = [sys.executable, "-m", "onediffx.bench.peer_server", *source, "--port", str(port), "--warm", json.dumps(warm)]
    cmd += [arg for name, path in files.items() for arg in ("--lora", f"{name}={path}")]
    if "torch.compile" in _peer_label(cfg):
        cmd.append("--compile")
        cmd += ["--mode", cfg.bench.serve_peer_mode] if cfg.bench.serve_peer_mode else []
    inductor = Path(cfg.bench.serve_peer_cache).expanduser().resolve() if cfg.bench.serve_peer_cache else work / "inductor-peer"
    return _Process(_peer_label(cfg), cmd, _env(inductor), work / "peer.log", port)


def _peer_label(cfg: DictConfig) -> str:
    compiled = cfg.bench.peer_compile and cfg.compile.backend != "none"
    mode = f" mode={cfg.bench.serve_peer_mode}" if compiled and cfg.bench.serve_peer_mode else ""
    return f"diffusers{' + torch.compile' + mode if compiled else ' eager'} (1 at a time)"


def _samples(response: Any, wanted: set[str]) -> dict[str, float]:
    """The ``wanted`` samples of a ``/metrics`` answer (none from a server without it: the peer)."""
    from prometheus_client.parser import text_string_to_metric_families

    if response.status_code != 200:
        return {}
    return {s.name: s.value for f in text_string_to_metric_families(response.text) for s in f.samples
            if s.name in wanted}


def _after_weights(url: str) -> Optional[float]:
    """Seconds from the model weights loaded to ready, by the server's own clock (``None`` for a
    server without those gauges: the peer). The issue's start target is counted from there: how
    long weights take to read depends on the disk, not on onediffx."""
    times = _scrape(url, {"onediffx_weights_loaded_time_seconds", "onediffx_ready_time_seconds"})
    if len(times) < 2 or not all(times.values()):
        return None
    return round(times["onediffx_ready_time_seconds"] - times["onediffx_weights_loaded_time_seconds"], 2)


def _scrape(url: str, wanted: set[str]) -> dict[str, float]:
    with Client(url) as client:
        return _samples(client.http.get("/metrics"), wanted)


def _metric_sums(url: str) -> dict[str, float]:
    return _scrape(url, {"onediffx_batch_size_sum", "onediffx_batch_size_count", "onediffx_lora_switches_total"})


def _stats(latencies: list[float], images: int, wall: float, errors: int) -> dict[str, Any]:
    lat = np.asarray(latencies) if latencies else np.asarray([float("nan")])
    return {"requests": len(latencies) + errors, "errors": errors, "images_per_s": round(images / wall, 3),
            "p50_s": round(float(np.percentile(lat, 50)), 3), "p99_s": round(float(np.percentile(lat, 99)), 3)}


async def _closed(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    latencies, errors, images = [], 0, 0
    queue = iter(bodies)
    async with AsyncClient(url, timeout=3600) as client:
        async def worker() -> None:
            nonlocal errors, images
            for body in queue:
                start = time.perf_counter()
                response = await client.request(body)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                    images += len(response.json()["data"])
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return _stats(latencies, images, wall, errors)


async def _queue_depth(client: AsyncClient) -> Optional[float]:
    """The server's ``onediffx_queue_depth`` gauge now (``None`` for a server without it: the peer)."""
    try:
        response = await client.http.get("/metrics", timeout=5)
    except Exception:  # noqa: BLE001 - a slow /metrics answer is a missed sample, not a failed run
        return None
    return _samples(response, {"onediffx_queue_depth"}).get("onediffx_queue_depth")


async def _open(url: str, bodies: list[dict[str, Any]], rate: float, seed: int = 0) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` requests/s; latency counts from the scheduled arrival. The server's
    queue depth is sampled every quarter second: the open-loop target bounds it by ``serve.queue_limit``."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(bodies))
    latencies, errors, images = [], 0, 0
    depths: list[float] = []
    async with AsyncClient(url, timeout=3600, max_connections=1024) as client:
        start = time.perf_counter()

        async def watch() -> None:
            while True:
                depth = await _queue_depth(client)
                if depth is None and not depths:
                    return  # no gauge: nothing to watch
                if depth is not None:
                    depths.append(depth)
                await asyncio.sleep(0.25)

        watcher = asyncio.create_task(watch())

        async def one(at: float, body: dict[str, Any]) -> None:
            nonlocal errors, images
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            response = await client.request(body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - (start + at))
                images += len(response.json()["data"])
            else:
                errors += 1

        await asyncio.gather(*(one(at, body) for at, body in zip(np.cumsum(gaps), bodies)))
        wall = time.perf_counter() - start
        watcher.cancel()
    return {**_stats(latencies, images, wall, errors), "offered_per_s": round(rate, 3),
            "max_queue_depth": max(depths) if depths else None}


def _drive(cfg: DictConfig, server: str, url: str) -> list[dict[str, Any]]:
    rows, offset, best = [], count(0, 1000), 0.0
    for concurrency in cfg.bench.serve_concurrency:
        n = max(cfg.bench.serve_requests, 2 * concurrency)
        before = _metric_sums(url)
        result = asyncio.run(_closed(url, request_mix(cfg, n, next(offset)), concurrency))
        after = _metric_sums(url)
        best = max(best, result["images_per_s"])
        rows.append(_logged({"scenario": "serve", "server": server, "load": f"closed, {concurrency} clients",
                             **result, **_batching(before, after)}))
    single = next((r["p50_s"] for r in rows if r["load"] == "closed, 1 clients"), None)
    for fraction in cfg.bench.serve_open_fractions if best > 0 else ():
        before = _metric_sums(url)
        result = asyncio.run(_open(url, request_mix(cfg, cfg.bench.serve_requests, next(offset)), fraction * best))
        rows.append(_logged({"scenario": "serve", "server": server, "load": f"open (Poisson), {fraction:.0%} of best",
                             **result, "p99_over_single": round(result["p99_s"] / single, 2) if single else None,
                             **_batching(before, _metric_sums(url))}))
    return rows


def _batching(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    if not after:
        return {"mean_batch": 1.0, "lora_switches": None}
    calls = after["onediffx_batch_size_count"] - before.get("onediffx_batch_size_count", 0.0)
    images = after["onediffx_batch_size_sum"] - before.get("onediffx_batch_size_sum", 0.0)
    switches = after.get("onediffx_lora_switches_total", 0.0) - before.get("onediffx_lora_switches_total", 0.0)
    return {"mean_batch": round(images / calls, 2) if calls else None, "lora_switches": int(switches)}


def _logged(row: dict[str, Any]) -> dict[str, Any]:
    """Each row is logged as it is measured: the report is written once the scenario ends, and a run
    cut short by a time limit would otherwise keep none of the load levels it finished."""
    log.info("serve row: %s", json.dumps(row))
    return row


def _ready_row(server: str, label: str, seconds: float, exit_code: Optional[int],
               after_weights: Optional[float] = None) -> dict[str, Any]:
    extra = {} if after_weights is None else {"ready_after_weights_s": after_weights}
    return _logged({"scenario": "serve", "server": server, "load": label, "ready_s": round(seconds, 2),
                    "exit_code": exit_code, **extra})


@contextlib.contextmanager
def _sigterm_stops_servers() -> Iterator[None]:
    """SIGTERM (``timeout``, an orchestrator) ends Python without running ``finally`` clauses, and the
    servers, in process groups of their own, do not get it: one kept compiling after its bench was
    gone. As ``SystemExit`` it unwinds through the ``finally`` clauses that stop them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_serve_bench(cfg: DictConfig, logs: Optional[Path] = None) -> list[dict[str, Any]]:
    """Rows for onediffx (cold and warm start, then load levels) and the diffusers peer. Each
    server's own log (its start-up table says where the seconds to ready went) is copied to ``logs``."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    with _sigterm_stops_servers(), tempfile.TemporaryDirectory(prefix="onediffx-serve-bench-") as tmp:
        work = Path(tmp)
        try:
            return _serve_rows(cfg, work)
        finally:
            if logs is not None:
                logs.mkdir(parents=True, exist_ok=True)
                for server_log in work.glob("*.log"):
                    shutil.copy2(server_log, logs / server_log.name)


def _fill_jobs(cfg: DictConfig) -> int:
    return max(1, min(cfg.bench.serve_fill_jobs, len(_sizes(cfg))))


def _cold_start(cfg: DictConfig, work: Path) -> tuple[float, Optional[int]]:
    """onediffx's first start: ``serve_fill_jobs`` processes, each warming its share of the sizes."""
    sizes = _sizes(cfg)
    jobs = _fill_jobs(cfg)
    servers = [_onediffx(cfg, work, f"onediffx cold {i}" if jobs > 1 else "onediffx cold", sizes[i::jobs])
               for i in range(jobs)]
    codes: list[Optional[int]] = []
    try:
        seconds = max(server.wait_ready(cfg.bench.serve_ready_timeout) for server in servers)
    finally:
        codes = _stop_all(servers)
    return seconds, next((c for c in codes if c), codes[0] if codes else None)


def _peer_start(cfg: DictConfig) -> str:
    """Whether the peer starts from Inductor's on-disk caches: a named folder that is still empty (a
    fresh GPU machine) is a cold start, not a warm one."""
    folder = Path(cfg.bench.serve_peer_cache).expanduser() if cfg.bench.serve_peer_cache else None
    return "warm Inductor cache" if folder and folder.is_dir() and any(folder.iterdir()) else "cold"


def _serve_rows(cfg: DictConfig, work: Path) -> list[dict[str, Any]]:
    fill_only = not cfg.bench.serve_concurrency
    files = _loras(cfg, work)
    if not cfg.bench.serve_onediffx:
        what = f"{_peer_start(cfg)}, alone"
        return _peer_rows(cfg, _peer(cfg, work, files), f"start → /readyz, {what}", measure=not fill_only)
    early = cfg.bench.serve_peer and (fill_only or cfg.bench.serve_peer_early)
    peer = _peer(cfg, work, files) if early else None  # its compile overlaps onediffx's starts and loads
    try:
        rows = _onediffx_rows(cfg, work)
    except BaseException:
        if peer is not None:
            peer.stop()
        raise
    if not cfg.bench.serve_peer:
        return rows
    what = "beside onediffx's fill" if fill_only else "started beside onediffx's runs" if early else \
        _peer_start(cfg)
    return rows + _peer_rows(cfg, peer or _peer(cfg, work, files), f"start → /readyz, {what}", measure=not fill_only)


def _onediffx_rows(cfg: DictConfig, work: Path) -> list[dict[str, Any]]:
    """onediffx's first start (the fill), its warm start, then the load levels on the warm server."""
    cold_s, code = _cold_start(cfg, work)
    what = "first start" if cfg.compile.backend == "none" else \
        "cold (compile + save graphs)" if not cfg.bench.serve_cache else f"first start on {cfg.bench.serve_cache}"
    jobs = _fill_jobs(cfg)
    rows = [_ready_row("onediffx", f"start → /readyz, {what}" + (f", {jobs} processes" if jobs > 1 else ""), cold_s, code)]
    warm = _onediffx(cfg, work, "onediffx warm")
    try:
        warm_s = warm.wait_ready(cfg.bench.serve_ready_timeout)
        after_weights = _after_weights(warm.url)
        log.info("serve: onediffx warm start ready in %.2f s (%s s after the weights)", warm_s, after_weights)
        measured = _drive(cfg, "onediffx", warm.url)  # none in a fill-only run
    finally:
        code = warm.stop()
    return rows + [_ready_row("onediffx", "start → /readyz, warm graph cache", warm_s, code, after_weights)] + measured


def _peer_rows(cfg: DictConfig, peer: _Process, what: str, measure: bool) -> list[dict[str, Any]]:
    """The peer's start and (``measure``) its load levels; a peer that fails (a recompile storm, an
    OOM) is one error row, never the loss of onediffx's rows."""
    rows: list[dict[str, Any]] = []
    try:
        peer_s = peer.wait_ready(cfg.bench.serve_ready_timeout)
        # logged now, not after the load levels: a run cut short during the peer's load levels must
        # still say whether it had ever been ready
        log.info("serve: %s ready in %.2f s (%s)", peer.label, peer_s, what)
        if measure:
            rows = _drive(cfg, peer.label, peer.url)
    except Exception as err:  # noqa: BLE001
        return [{"scenario": "serve", "server": peer.label, "error": f"{type(err).__name__}: {err}"[:300]}]
    finally:
        code = peer.stop()
    return [_ready_row(peer.label, what, peer_s, code)] + rows
