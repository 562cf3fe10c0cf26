"""``python -m onediffx.instantid.convert ip-adapter.bin ip-adapter.safetensors``: convert the face adapter once.

The published ``ip-adapter.bin`` is a pickle. It is read here with ``torch.load(weights_only=True)``
and written as safetensors; ``model.instantid`` then prefers ``ip-adapter.safetensors`` beside it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..errors import OnediffxError
from .weights import convert


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onediffx.instantid.convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="ip-adapter.bin (image_proj and ip_adapter state dicts)")
    parser.add_argument("target", help="ip-adapter.safetensors to write")
    args = parser.parse_args(argv)
    try:
        path = convert(args.source, args.target)
    except OnediffxError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
