"""Command-line entry: ``python -m onediffx {run,list,bench} [hydra overrides]``.

Each command is a Hydra app over ``conf/`` so overrides, ``-m`` sweeps, ``--cfg job`` and
launchers work as in any Hydra project. User-facing failures (``OnediffxError``) print one line
and exit non-zero; ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from .config import register_configs
from .errors import OnediffxError
from .resources import conf_dir

# transformers warns at import about optional image backends; users of a CLI cannot act on that.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

USAGE = """usage: python -m onediffx COMMAND [overrides...]

commands:
  run     assemble the pipeline from conf/ + overrides, generate, write images and metrics.json
  list    show the models, stages, compile backends and LoRA entries known
  bench   peers and onediffx side by side on the same model (see conf/bench.yaml)

examples:
  python -m onediffx run
  python -m onediffx run model=tiny_xl steps=4 seed=1
  python -m onediffx run -m seed=0,1,2
  python -m onediffx run --cfg job        # print the composed config
"""


# Worker processes of a launcher inherit the variable hydra_app sets; ONEDIFFX_FULL_ERROR keeps
# what the user asked for.
USER_FULL_ERROR = os.environ.get("ONEDIFFX_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR")) == "1"


def full_error() -> bool:
    """Whether the user asked for tracebacks (read before ``hydra_app`` sets the variable itself)."""
    return USER_FULL_ERROR


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


def report(err: OnediffxError) -> None:
    print(f"onediffx: error: {err}", file=sys.stderr, flush=True)


def guarded(job: Callable[[DictConfig, Path], dict]) -> Callable[[DictConfig], dict]:
    """Wrap a job so a user error is one line: exit code in a single run, a failed row in a sweep."""

    def task(cfg: DictConfig) -> dict:
        hydra_cfg = HydraConfig.get()
        out_dir = Path(hydra_cfg.runtime.output_dir)
        try:
            return job(cfg, out_dir)
        except OnediffxError as err:
            if full_error():
                raise
            report(err)
            if hydra_cfg.mode == RunMode.MULTIRUN:
                from .metrics import write_json

                failed = {"status": "failed", "error": str(err), "error_type": type(err).__name__}
                write_json(out_dir / "metrics.json", failed)
                return failed
            sys.exit(err.exit_code)

    return task


def hydra_app(config_name: str, job: Callable[[DictConfig, Path], dict], argv: list[str]) -> None:
    """Run ``job`` as a Hydra app over ``conf/<config_name>.yaml`` with ``argv`` as overrides."""
    register_configs()
    sys.argv = [f"onediffx {config_name}", *argv]
    main = hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")(guarded(job))
    os.environ.setdefault("ONEDIFFX_FULL_ERROR", "1" if USER_FULL_ERROR else "0")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us, to be printed in one line
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        if full_error():
            raise
        print(f"onediffx: error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "run":
        from .commands.run import run_job

        hydra_app("run", run_job, rest)
    elif command == "list":
        from .commands.listing import print_catalogue

        print_catalogue()
    elif command == "bench":
        from .commands.bench import bench_job

        hydra_app("bench", bench_job, rest)
    else:
        print(f"onediffx: error: unknown command {command!r}; commands: run, list, bench", file=sys.stderr)
        sys.exit(2)
