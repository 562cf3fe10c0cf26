"""``python -m onediffx.commands.background_compile CONFIG``: assemble once to fill the graph cache, then exit.

Started by the compile stage's progressive mode (``stages/progressive.py``, by module name: a stage
never imports the app) with a resolved run config.
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from ..config.schema import RunConfig
from ..resolver import assemble


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m onediffx.commands.background_compile CONFIG.yaml", file=sys.stderr)
        return 2
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(argv[0]))
    asm = assemble(cfg)
    saved = asm.report.get("save-graph", {})
    print(f"background compile done: saved={saved.get('saved')} compiled={saved.get('compiled_here')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
