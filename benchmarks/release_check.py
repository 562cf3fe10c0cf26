"""What a released pipeline leaves allocated on the GPU, step by step (thirteenth session).

The quantize bench found 2.74 GiB still allocated on an H200 after it released the SDXL pipeline of
its ``quantize=off`` row (compiled in process, saved, LoRA-switched); the same flows on the CPU leave
no tensor alive. Each case here builds the tiny SDXL on the GPU, runs part of that row's flow,
drops the pipeline and reports what is still allocated, whether the UNet object survived, and the
largest CUDA tensors the garbage collector can still see.

    python benchmarks/release_check.py            # all cases, one line each

First result (H200, thirteenth session): eager leaves nothing; every compiled case leaves 134–167 MiB
and the UNet's weights (gc still sees them, though the UNet object is gone); LoRA with its copies on
the GPU leaves nothing more. ``held_by`` (added after that run) names what holds the largest survivor.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import weakref
from pathlib import Path

import torch

from onediffx.compile import compile_options, compile_pipe, save_pipe
from onediffx.models.tiny import tiny_sdxl

CASES = ["eager", "compile", "compile+save", "compile+lora", "lora-cuda", "compile+save+lora-cuda"]


def _flow(case: str, folder: Path) -> weakref.ref:
    pipe = tiny_sdxl().to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    if "compile" in case:
        compile_pipe(pipe, "inductor", compile_options("inductor"))
    pipe("a cat", num_inference_steps=2, height=128, width=128)
    if "save" in case:
        save_pipe(pipe, str(folder / case))
    if "lora" in case:
        import onediffx.lora as lora
        from onediffx.lora.synthetic import lora_targets, random_lora, save_kohya

        files = [save_kohya(random_lora(lora_targets(pipe), 4, seed=s), folder / f"{s}.safetensors") for s in (1, 2)]
        offload = "cuda" if "lora-cuda" in case else "cpu"
        for i, path in enumerate(files):
            lora.load_lora_and_optionally_fuse(pipe, str(path), f"l{i}", fuse=False, offload_device=offload)
        for i in range(3):
            lora.set_and_fuse_adapters(pipe, [f"l{i % 2}"], [1.0])
        lora.unfuse_lora(pipe)
        lora.delete_adapters(pipe)
    return weakref.ref(pipe.unet)


def _live_cuda_tensors() -> list[torch.Tensor]:
    found = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda:
                found[obj.untyped_storage().data_ptr()] = obj
        except Exception:  # noqa: BLE001 - tensor subclasses without storage
            continue
    return sorted(found.values(), key=lambda t: -t.untyped_storage().nbytes())


def _holders(obj: object, depth: int = 3) -> list[str]:
    """Who keeps ``obj`` alive: the types (and, for dicts, a few keys) of its referrers, ``depth`` levels up."""
    chain, level = [], [obj]
    for _ in range(depth):
        here = [r for o in level for r in gc.get_referrers(o) if r is not level and not isinstance(r, type(sys._getframe()))]
        chain.append(", ".join(sorted({type(r).__qualname__ + (f"{list(r)[:4]}" if isinstance(r, dict) else "")
                                       for r in here[:8]})))
        level = here[:8]
    return chain


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="onediffx-release-"))
    for case in sys.argv[1:] or CASES:
        before = torch.cuda.memory_allocated()
        unet = _flow(case, folder)
        gc.collect()
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        tensors = _live_cuda_tensors()
        print("release check:", json.dumps({
            "case": case, "left_mib": round((torch.cuda.memory_allocated() - before) / 2**20, 2),
            "unet_alive": unet() is not None, "gc_cuda_tensors": len(tensors),
            "gc_cuda_mib": round(sum(t.untyped_storage().nbytes() for t in tensors) / 2**20, 2),
            "largest": [[list(t.shape), str(t.dtype)] for t in tensors[:3]],
            "held_by": _holders(tensors[0]) if tensors else None}), flush=True)
        del tensors


if __name__ == "__main__":
    main()
