"""The Hydra callback that turns a finished multirun into ``summary.csv``, ``summary.md``, ``summary.png``.

Registered under ``hydra.callbacks`` in ``conf/run.yaml``, so it works with every launcher (basic,
joblib, submitit): it runs in the process that started the sweep, after all jobs returned, and reads
only what the jobs wrote to disk.

It also keeps one broken job from losing the sweep. Hydra's sweeper re-raises the first failed job
after the batch, which skips ``on_multirun_end``; a job that fails with an unexpected exception
(a CUDA out-of-memory, a bug) is therefore turned into a failed ``metrics.json`` here, its traceback
printed, and the sweep goes on to its summary.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ..errors import OnediffxError
from .outcome import OUTCOME


class SweepSummary(Callback):
    """Summarise a multirun at its end; record unexpected job failures as failed rows."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED or config.hydra.mode != RunMode.MULTIRUN:
            return
        from ..commands.user_errors import full_error, report
        from ..metrics import write_json

        err = job_return._return_value  # the exception; the public getter re-raises it
        if not isinstance(err, Exception):
            return
        user_error = isinstance(err, OnediffxError)
        if user_error and not full_error():
            report(err)
        else:
            traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        message = str(err) if user_error else f"{type(err).__name__}: {err}"
        failed = {"status": "failed", "error": (message.splitlines() or [""])[0], "error_type": type(err).__name__}
        write_json(Path(config.hydra.runtime.output_dir) / "metrics.json", failed)
        job_return.status = JobStatus.COMPLETED
        job_return.return_value = failed

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .summary import read_jobs

        sweep_dir = Path(config.hydra.sweep.dir)
        rows = read_jobs(sweep_dir)
        OUTCOME.jobs, OUTCOME.failed, OUTCOME.summary = len(rows), sum(not r.ok for r in rows), sweep_dir
        if not OmegaConf.select(config, "sweep.summary", default=True):
            return
        try:  # the summary's libraries come with the `sweep` extra
            import matplotlib  # noqa: F401
            import skimage.metrics  # noqa: F401
        except ImportError as err:
            print(f"onediffx: warning: no sweep summary: {err}; install it with pip install 'onediffx[sweep]'",
                  file=sys.stderr, flush=True)
            return
        from .report import write_summary

        summary = write_summary(sweep_dir, OmegaConf.select(config, "sweep.baseline"))
        for note in summary.notes:
            print(f"onediffx: warning: {note}", file=sys.stderr, flush=True)
        failed = sum(not r.ok for r in summary.rows)
        OUTCOME.summary = sweep_dir / "summary.md"
        print(f"sweep summary: {sweep_dir / 'summary.md'} ({len(summary.rows)} jobs, {failed} failed)", flush=True)
