"""What a released pipeline leaves allocated on the GPU, and what holds it.

The quantize bench found 2.74 GiB still allocated on an H200 after it released the SDXL pipeline of
its ``quantize=off`` row; the same flows on the CPU leave no tensor alive. Each case here builds the
tiny SDXL on the GPU, runs part of that row's flow, drops the pipeline and reports what is still
allocated, whether the UNet object survived, the CUDA tensors the garbage collector can still see
with the chain of objects that holds the largest, and what is left after clearing each process-wide
cache in turn.

    python benchmarks/scripts/release_check.py                  # all cases, one line each
    python benchmarks/scripts/release_check.py compile          # one case

What it found on an H200 (``results/2026-12-03-h200/release-check.log``):
eager leaves nothing; each compiled case left 134–200 MiB and an up block of the UNet. The megabytes
were cuBLAS workspaces, one per stream cuBLAS ran on, kept for the process's life: every capture
warmed up on a new stream (now one capture stream per device, ``cuda_graphs.py``). The up block sat
in Dynamo's process-wide guard scope, left there by a failed source evaluation (``compile/guard_scope.py``
now removes it when the evaluation fails). With both fixes, the quantize bench left 0.00 GiB after its
unquantized SDXL row and 0.07 GiB (the two workspaces) after the next."""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import types
import weakref
from pathlib import Path
from typing import Callable

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


def _describe(obj: object) -> str:
    """A referrer in a few words: its type, and what names it (a dict's owner, a frame's code line)."""
    if isinstance(obj, dict):
        owners = [type(r).__qualname__ for r in gc.get_referrers(obj) if getattr(r, "__dict__", None) is obj]
        return f"dict of {owners[0]}" if owners else f"dict{list(obj)[:3]}"
    if isinstance(obj, types.ModuleType):
        return f"module {obj.__name__}"
    if isinstance(obj, types.FrameType):
        return f"frame {obj.f_code.co_name} {Path(obj.f_code.co_filename).name}:{obj.f_lineno}"
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    return type(obj).__qualname__ + (f" {name}" if isinstance(name, str) else "")


def _holders(obj: object, ignore: list, depth: int = 24) -> list[str]:
    """A chain of referrers of ``obj`` up to ``depth`` levels: each level lists every new referrer
    (this script's own frame and lists left out) and the walk goes on from the first that is not a
    list, so the line ends where something outside the module tree holds it."""
    chain, seen, here = [], {id(obj), id(ignore)}, obj
    mine = sys._getframe()
    for _ in range(depth):
        up = [r for r in gc.get_referrers(here) if id(r) not in seen and r is not ignore and r is not mine
              and not (isinstance(r, types.FrameType) and r.f_code.co_filename == __file__)]
        seen.add(id(up))
        if not up:
            chain.append("(no referrer: held outside Python)")
            break
        seen.update(id(r) for r in up)
        chain.append(" | ".join(_describe(r) for r in up[:6]))
        here = next((r for r in up if not isinstance(r, list)), up[0])
    return chain


def _left(before: int) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return round((torch.cuda.memory_allocated() - before) / 2**20, 2)


def _clears() -> list[tuple[str, Callable[[], object]]]:
    """Process-wide caches that could hold a released pipeline's memory, cleared one after another."""
    from torch._inductor.codecache import PyCodeCache

    found = [("dynamo.reset", torch._dynamo.reset), ("PyCodeCache", PyCodeCache.cache_clear),
             ("cublas workspaces", torch._C._cuda_clearCublasWorkspaces)]
    try:
        from torch._dynamo.precompile_context import PrecompileContext

        found.append(("PrecompileContext", PrecompileContext.clear))
    except ImportError:
        pass
    return found


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="onediffx-release-"))
    for case in sys.argv[1:] or CASES:
        before = torch.cuda.memory_allocated()
        unet = _flow(case, folder)
        gc.collect()
        left = {"gc": _left(before)}
        tensors = _live_cuda_tensors()
        report = {
            "case": case, "unet_alive": unet() is not None, "gc_cuda_tensors": len(tensors),
            "gc_cuda_mib": round(sum(t.untyped_storage().nbytes() for t in tensors) / 2**20, 2),
            "largest": [[list(t.shape), str(t.dtype)] for t in tensors[:3]],
            "held_by": _holders(tensors[0], tensors) if tensors else None}
        del tensors
        for name, clear in _clears():
            clear()
            gc.collect()
            left[name] = _left(before)
        report["left_mib_after"] = left
        report["unet_alive_at_end"] = unet() is not None
        print("release check:", json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
