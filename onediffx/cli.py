"""Command-line entry: ``python -m onediffx {run,list,bench} [hydra overrides]``.

Each command is a Hydra app over ``conf/`` so overrides, ``-m`` sweeps, ``--cfg job`` and
launchers work as in any Hydra project. User-facing failures (``OnediffxError``) print one line
and exit non-zero; ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from .commands.user_errors import USER_FULL_ERROR, full_error, report
from .config import register_configs, validate
from .errors import BusyError, OnediffxError
from .requirements import check as check_requirements
from .resources import conf_dir

# transformers warns at import about optional image backends; users of a CLI cannot act on that.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

USAGE = """usage: python -m onediffx COMMAND [overrides...]

commands:
  run     assemble the pipeline from conf/ + overrides, generate, write images and metrics.json
  list    show the models, stages, compile backends and LoRA entries known
  bench   peers and onediffx side by side on the same model (see conf/bench.yaml)
  serve   the assembled pipeline behind an OpenAI-style HTTP images API (see conf/serve.yaml)

examples:
  python -m onediffx run
  python -m onediffx run model=tiny_xl steps=4 seed=1
  python -m onediffx run -m seed=0,1,2
  python -m onediffx serve serve.port=8000   # POST /v1/images/generations
  python -m onediffx run --cfg job        # print the composed config
"""


def one_line(err: Exception) -> str:
    """Hydra's multi-line composition errors, as the one line the CLI prints."""
    if isinstance(err, MissingConfigException) and err.options:
        first = str(err).splitlines()[0]
        return f"{first}; available: {', '.join(o for o in err.options if not o.endswith('_schema'))}"
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        hints = [line for line in str(err).splitlines() if line.startswith("To append")]
        return "; ".join([f"{cause.full_key}: {cause.msg.splitlines()[0]}", *hints])
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


JOBS = {"run": ("onediffx.commands.run", "run_job"), "bench": ("onediffx.commands.bench", "bench_job"),
        "serve": ("onediffx.commands.serve", "serve_job")}
"""Each Hydra command's job, imported only after its config has composed and validated."""
PRODUCED_NOTHING = {".hydra", "config.yaml"}


def quiet_third_party() -> None:
    """Silence warnings a CLI user cannot act on (deprecations inside diffusers, hub notices).

    Environment variables, so launcher workers and background compiles are quiet too; the user's
    ``HYDRA_FULL_ERROR=1`` (or ``ONEDIFFX_VERBOSE=1``) keeps everything.
    """
    if USER_FULL_ERROR or os.environ.get("ONEDIFFX_VERBOSE") == "1":
        return
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    # diffusers imports torchao whenever it is installed; its notes about kernels built for other
    # cards (and the pytree registrations it triggers in torch) are not the user's to fix.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def discard_if_empty(out_dir: Path) -> None:
    """A run that failed before producing anything leaves no folder (only what Hydra and we wrote first)."""
    if not out_dir.is_dir() or out_dir.resolve() == Path.cwd().resolve():
        return
    entries = {p.name for p in out_dir.iterdir()}
    log = out_dir / "onediffx.log"
    if log.is_file() and log.stat().st_size == 0:
        entries.discard(log.name)
    if not entries <= PRODUCED_NOTHING:
        return
    shutil.rmtree(out_dir, ignore_errors=True)


def guarded(command: str) -> Callable[[DictConfig], dict]:
    """The Hydra task of ``command``: validate first, then run; a user error is one line (an exit
    code in a single run, a failed row in a sweep)."""

    def task(cfg: DictConfig) -> dict:
        hydra_cfg = HydraConfig.get()
        out_dir = Path(hydra_cfg.runtime.output_dir)
        try:
            validate(cfg)  # before torch or diffusers is imported: a typo costs a fraction of a second
            module, name = JOBS[command]
            job: Callable[[DictConfig, Path], dict] = getattr(importlib.import_module(module), name)
            return job(cfg, out_dir)
        except OnediffxError as err:
            if full_error():
                raise
            report(err)
            ours = not isinstance(err, BusyError)  # a busy folder is another run's: leave it be
            if hydra_cfg.mode == RunMode.MULTIRUN:
                from .metrics import write_json

                failed = {"status": "failed", "error": str(err), "error_type": type(err).__name__}
                if ours and not (out_dir / "metrics.json").is_file():  # a job's own failure report wins
                    write_json(out_dir / "metrics.json", failed)
                return failed
            if ours:
                discard_if_empty(out_dir)
            sys.exit(err.exit_code)

    return task


def hydra_app(command: str, argv: list[str]) -> None:
    """Run ``command`` as a Hydra app over ``conf/<command>.yaml`` with ``argv`` as overrides."""
    register_configs()
    sys.argv = [f"onediffx {command}", *argv]
    main = hydra.main(config_path=str(conf_dir()), config_name=command, version_base="1.3")(guarded(command))
    os.environ.setdefault("ONEDIFFX_FULL_ERROR", "1" if USER_FULL_ERROR else "0")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us, to be printed in one line
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        if full_error():
            raise
        print(f"onediffx: error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(2)
    from .sweep.outcome import OUTCOME

    if OUTCOME.jobs and OUTCOME.failed == OUTCOME.jobs:  # a sweep in which nothing worked is a failure
        print(f"onediffx: error: all {OUTCOME.jobs} jobs of the sweep failed; see {OUTCOME.summary}",
              file=sys.stderr, flush=True)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    quiet_third_party()
    try:
        check_requirements()
    except OnediffxError as err:
        report(err)
        sys.exit(err.exit_code)
    if command in JOBS:
        hydra_app(command, rest)
    elif command == "list":
        from .commands.listing import print_catalogue

        print_catalogue()
    else:
        print(f"onediffx: error: unknown command {command!r}; commands: run, list, bench, serve", file=sys.stderr)
        sys.exit(2)
