"""A restart through the Python API, in its own process: OneDiffX's ``load_pipe`` snippet, timed.

    python -m onediffx.bench.library_start --arch sdxl --cache-dir DIR --preset inductor

The order is the documented one: ``from onediffx import compile_pipe, load_pipe`` first, then the
weights, then ``compile_pipe(pipe)``, ``load_pipe(pipe, dir)`` and the first image. Prints one
JSON line: seconds to load the model, for ``compile_pipe``, for ``load_pipe``, and from the model
loaded to the first image, plus how many graphs were loaded and compiled (a restart compiles none).
"""

from __future__ import annotations

import argparse
import json
import time

START = time.perf_counter()

import torch  # noqa: E402

from onediffx import compile_options, compile_pipe, load_pipe  # noqa: E402


def _load(args: argparse.Namespace, device: torch.device):
    if args.builtin:
        from onediffx.models.tiny import build_tiny

        return build_tiny(args.builtin).to(device)
    from onediffx.models.synthetic import build_synthetic

    return build_synthetic(args.arch, device, torch.float16 if device.type == "cuda" else torch.float32)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sdxl")
    parser.add_argument("--builtin", default=None)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--preset", default="inductor")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = _load(args, device)
    pipe.set_progress_bar_config(disable=True)
    _synchronize(device)
    loaded = time.perf_counter()
    compile_pipe(pipe, options=compile_options(args.preset))
    compiled = time.perf_counter()
    found = load_pipe(pipe, dir=args.cache_dir)
    graphs_loaded = time.perf_counter()
    pipe(prompt="a photo of an astronaut riding a horse on the moon", height=args.height, width=args.width,
         num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(0))
    _synchronize(device)
    done = time.perf_counter()
    from onediffx.compile.pipe import compile_counters

    counters = compile_counters(pipe)
    print(json.dumps({
        "load_s": loaded - START, "compile_pipe_s": compiled - loaded, "load_pipe_s": graphs_loaded - compiled,
        "first_image_s": done - loaded, "hit": all(v["hit"] for v in found.values()) and bool(found),
        "graphs_loaded": counters["graphs_loaded"], "graphs_compiled": counters["graphs_compiled"],
    }))


if __name__ == "__main__":
    main()
