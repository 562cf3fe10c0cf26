"""``python -m onediffx serve``: the assembled pipeline behind HTTP (FastAPI on uvicorn).

The config is ``run``'s (so ``+launch=sdxl_prod`` serves what it runs) plus ``serve.*``. Config
mistakes, a port in use and a host that is not this machine's fail before anything loads (the socket is
bound first); the pipeline then assembles in the background while
``/healthz`` answers and ``/readyz`` says 503. SIGTERM (or Ctrl+C) stops accepting connections,
answers every request already received, and exits 0.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..config.schema import serve_options
from ..errors import NotAvailableError
from ..startup import startup_table
from ..resolver import plan


def _server_stack() -> Any:
    try:
        import uvicorn
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as err:
        raise NotAvailableError(f"serve: {err.name} is not installed; pip install 'onediffx[serve]'") from None
    return uvicorn


def check_serve(cfg: DictConfig) -> None:
    """``serve.*`` checked by ``ServeConfig.validate``, before anything listens or loads."""
    serve_options(cfg).validate("serve.")


def door_options(cfg: DictConfig) -> dict[str, Any]:
    """uvicorn's own bounds on slow and idle clients, from ``serve.*``. h11 is named (not uvicorn's
    ``auto``, which picks httptools when installed) because the header limit is an h11 option."""
    return dict(http="h11", h11_max_incomplete_event_size=cfg.serve.max_header_bytes,
                timeout_keep_alive=cfg.serve.keep_alive_s, limit_concurrency=cfg.serve.max_connections)


def serve_job(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Serve until SIGTERM/SIGINT; returns once every received request is answered."""
    check_serve(cfg)
    if cfg.serve.engine == "ray":
        from ..serve.ray_engine import serve_ray

        return serve_ray(cfg)
    uvicorn = _server_stack()
    from ..serve.app import create_app
    from ..serve.engine import LocalEngine

    from ..serve.listen import bind

    plan(cfg)  # stage names and options, LoRA files: checked before anything listens or loads
    sock = bind(cfg.serve.host, cfg.serve.port)  # a port in use is one line now, before the model loads
    port = sock.getsockname()[1]
    engine = LocalEngine(cfg)
    app = create_app(engine)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.serve.host, port=port, log_config=None,
                                           access_log=False, lifespan="on", timeout_graceful_shutdown=None,
                                           **door_options(cfg)))

    def ready(engine: LocalEngine) -> None:
        devices = ", ".join(str(r.asm.device) for r in engine.replicas)
        if cfg.startup_report:
            asm = engine.replicas[0].asm
            print(startup_table(asm.report, backend=cfg.compile.backend, cache_dir=cfg.cache.dir,
                                title=f"start-up: model {cfg.model.name} on {devices}"), flush=True)
        print(f"onediffx serve: ready in {engine.ready_seconds:.1f} s ({len(engine.devices)} replica(s): {devices})",
              flush=True)

    def failed(err: BaseException) -> None:
        server.should_exit = True

    engine.on_ready, engine.on_failure = ready, failed
    print(f"onediffx serve: listening on http://{cfg.serve.host}:{port} (POST /v1/images/generations, "
          f"/docs; ready when /readyz answers 200)", flush=True)
    # uvicorn re-raises the signal that stopped it once it has drained; a handler that returns makes
    # that a clean exit (0) instead of a kill by the signal.
    previous = {sig: signal.signal(sig, _drained) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if engine.error is not None:
        raise engine.error
    print("onediffx serve: stopped; every request received was answered", file=sys.stderr, flush=True)
    return {"status": "ok"}


def _drained(signum: int, frame: Any) -> None:
    """Runs when uvicorn re-raises the signal after its graceful shutdown: nothing left to do."""
