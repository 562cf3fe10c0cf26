"""``serve.engine=ray``: the same app as a Ray Serve deployment, one replica per GPU.

Each Ray replica builds a ``LocalEngine`` with one pipeline (the GPU Ray assigned it, or the CPU)
and serves ``create_app``'s routes through ``serve.ingress``; Ray's proxy routes requests among the
replicas and its autoscaler may add or remove them. A replica's constructor assembles and warms
the pipeline, so Ray sends it traffic only once it is ready. Batching happens inside each replica.
``RAY_ADDRESS`` joins an existing cluster; without it a local Ray instance is started.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..errors import NotAvailableError


def _ray() -> Any:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise NotAvailableError("serve.engine=ray: ray is not installed; pip install 'onediffx[ray]'") from None
    return ray, serve


class OnediffxReplica:
    """One Ray Serve replica: a one-pipeline ``LocalEngine`` and the HTTP app over it."""

    def __init__(self, config: dict[str, Any]) -> None:
        from ..config import register_configs
        from ..config.schema import ServeRunConfig
        from .engine import LocalEngine

        register_configs()
        cfg = OmegaConf.merge(OmegaConf.structured(ServeRunConfig), config)
        cfg.serve.replicas = "1"
        self.engine = LocalEngine(cfg)
        self.engine.load()  # Ray routes to this replica only once the constructor returns

    def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app

        return create_app(self.engine, lifespan=False)

    def check_health(self) -> None:
        if self.engine.error is not None:
            raise RuntimeError(f"pipeline failed: {self.engine.error}")


def _replicas(cfg: DictConfig, ray: Any) -> int:
    """``serve.replicas``: the number asked for, or ``all`` the cluster's GPUs (at least one)."""
    from ..config.schema import serve_options

    wanted = serve_options(cfg).replica_count
    return max(1, int(ray.cluster_resources().get("GPU", 0))) if wanted is None else wanted


def serve_ray(cfg: DictConfig) -> dict[str, Any]:
    """Deploy on Ray Serve and block until SIGTERM/SIGINT, then shut the deployment down."""
    ray, serve = _ray()
    from ..resolver import plan

    plan(cfg)  # config mistakes fail here, before a cluster is touched
    config = OmegaConf.to_container(cfg, resolve=True)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}}, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus and cfg.device in ("auto", "cuda"):
        options: dict[str, Any] = {"num_gpus": 1}
    else:
        config["device"] = "cpu" if cfg.device == "auto" else cfg.device
        options = {"num_cpus": cfg.serve.ray_num_cpus if cfg.serve.ray_num_cpus is not None else 1}
    count = _replicas(cfg, ray)
    deployment = serve.deployment(
        serve.ingress()(OnediffxReplica), name="onediffx", num_replicas=count, ray_actor_options=options,
        max_ongoing_requests=cfg.serve.queue_limit + cfg.serve.max_batch, health_check_period_s=10,
    )
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.run(deployment.bind(config), name="onediffx", route_prefix="/")
        print(f"onediffx serve: ready on Ray Serve at http://{cfg.serve.host}:{cfg.serve.port} "
              f"({count} replica(s), {options})", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        serve.shutdown()
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("onediffx serve: stopped (Ray Serve shut down)", flush=True)
    return {"status": "ok"}
