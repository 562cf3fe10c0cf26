"""A peer's restart, measured in its own process: plain ``torch.compile`` of the UNet, one image.

    python -m onediffx.bench.peer_start --arch sdxl --height 1024 --width 1024 --steps 30

Prints one JSON line: seconds to load the model, and from the model loaded to the first image.
Run twice with the same ``TORCHINDUCTOR_CACHE_DIR``: the first is a cold compile, the second uses
Inductor's warm on-disk caches (Dynamo still traces), which is what users of plain torch.compile
get after a restart.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch


def plain_pipeline(arch: str, builtin: str | None) -> tuple[Any, torch.device]:
    """The peers' pipeline: diffusers as loaded, nothing of onediffx applied (a built-in tiny model
    or the synthetic full-size one), on the GPU when there is one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if builtin:
        from onediffx.models.tiny import build_tiny

        pipe = build_tiny(builtin).to(device)
    else:
        from onediffx.models.synthetic import build_synthetic

        pipe = build_synthetic(arch, device, torch.float16 if device.type == "cuda" else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe, device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sdxl")
    parser.add_argument("--builtin", default=None)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    start = time.perf_counter()
    pipe, device = plain_pipeline(args.arch, args.builtin)
    loaded = time.perf_counter()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet, fullgraph=True)
    pipe(prompt="a photo of a cat", height=args.height, width=args.width, num_inference_steps=args.steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    done = time.perf_counter()
    print(json.dumps({"load_s": loaded - start, "first_image_s": done - loaded}))


if __name__ == "__main__":
    main()
