"""``parallel=cfg`` from the command line: the run starts its second process (rank 1) itself.

The peer is ``onediffx run`` again, with the job's own overrides plus ``parallel.rank=1``, the
rendezvous port, the next GPU and a folder of its own: it composes the same config, so it loads,
compiles and calls the pipeline exactly as the first process does, in lockstep, and its outputs are
thrown away. A peer that fails ends the run with one line naming its log, rather than leaving the
first process waiting at the next exchange until the timeout.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from ..device import resolve_device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return [o for o in HydraConfig.get().overrides.task if not o.split("=")[0].lstrip("+~").startswith(("parallel.rank",
                                                                                                       "parallel.port",
                                                                                                       "device"))]


def _watch(peer: subprocess.Popen, log: Path) -> None:
    """End the whole run when the peer fails: the first process would otherwise wait at its next exchange."""
    code = peer.wait()
    if code != 0:
        last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or ["no output"]
        print(f"onediffx: error: parallel=cfg: the second process (rank 1) exited with {code}: {last[0][:300]} "
              f"(its log: {log})", file=sys.stderr, flush=True)
        os._exit(2)


@contextmanager
def peer_process(cfg: DictConfig) -> Iterator[None]:
    """While open, rank 1 of ``cfg``'s ``parallel=cfg`` job runs beside this process (rank 0)."""
    OmegaConf.to_object(cfg.parallel).validate()  # a bad option is this process's one line, not the peer's
    port = int(cfg.parallel.port) or _free_port()
    cfg.parallel.port = port
    device = resolve_device(cfg.device)
    folder = Path(tempfile.mkdtemp(prefix="onediffx-rank1-"))
    log = folder / "rank1.log"
    args = [sys.executable, "-m", "onediffx", "run", *_job_overrides(), "parallel.rank=1", f"parallel.port={port}",
            f"device={'cuda:1' if device.type == 'cuda' else OmegaConf.select(cfg, 'device')}",
            f"hydra.run.dir={folder}"]
    with open(log, "w", encoding="utf-8") as out:
        peer = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watcher = threading.Thread(target=_watch, args=(peer, log), daemon=True, name="onediffx-rank1-watch")
    watcher.start()
    try:
        yield
    finally:
        watcher.join(timeout=int(cfg.parallel.timeout_s))
        if peer.poll() is None:
            peer.terminate()
        elif peer.returncode == 0:
            shutil.rmtree(folder, ignore_errors=True)  # its images are this process's; its log said nothing wrong
