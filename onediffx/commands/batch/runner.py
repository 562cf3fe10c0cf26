"""Batch prompts: ``prompts=file.jsonl`` generates one image per line with one assembled pipeline.

A batch can run for hours, so it is built to be interrupted: the prompts file is checked whole
before the model loads (``prompts``), and every finished image is journaled (``journal``), so
``resume=true`` continues where a kill stopped it.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ...config.schema import LoraStack
from ...device import peak_memory_gib, reset_peak_memory
from ...errors import ConfigError, NonFiniteError, NotAvailableError
from ...generate import Settings, generate
from ...metrics import versions, write_json
from ...models.pipelines import task_of
from ...resolver import assemble
from ..outputs import job_facts, print_startup, say_done
from .journal import MANIFEST, append_manifest, drop_torn_line, outputs, pending, read_manifest, save_png
from .prompts import PromptItem, read_prompts


class LoraScales:
    """Re-fuses the LoRA stack when a line's scales differ from what is fused now."""

    def __init__(self, cfg: DictConfig) -> None:
        stack = LoraStack.from_config(cfg.lora).entries
        self.entries = [(key, entry.adapter_name, float(entry.scale)) for key, entry in stack.items()]
        self.current = [scale for _, _, scale in self.entries]

    def apply(self, pipe: Any, item: PromptItem) -> None:
        weights = [item.lora_scales.get(key, scale) for key, _, scale in self.entries]
        if weights == self.current:
            return
        try:
            from ...lora import set_and_fuse_adapters
        except ImportError as err:
            raise NotAvailableError(
                f"prompts: line {item.line} sets lora_scales but the LoRA engine is not available ({err})"
            ) from None
        set_and_fuse_adapters(pipe, [name for _, name, _ in self.entries], weights)
        self.current = weights


def _warn_resume(message: str) -> None:
    print(f"onediffx: warning: resume: {message}", file=sys.stderr, flush=True)


def run_batch(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Generate every pending line of ``cfg.prompts``; returns what was written to ``metrics.json``."""
    if task_of(cfg.model.pipeline) == "img2vid":
        raise ConfigError(f"prompts: model {cfg.model.name} turns images into video; batch prompts need a text-to-image model")
    prompts = read_prompts(cfg)
    manifest = out_dir / MANIFEST
    if manifest.is_file() and not cfg.resume:
        raise ConfigError(f"prompts: {manifest} exists; pass resume=true to continue it, or choose another hydra.run.dir")
    if cfg.resume:
        drop_torn_line(manifest)
    done = read_manifest(manifest, warn=_warn_resume) if cfg.resume else {}
    todo = pending(prompts.items, done, out_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    counts = {"prompts_file": str(cfg.prompts), "prompts": len(prompts.items), "generated": len(todo),
              "resumed": len(prompts.items) - len(todo), "bad_lines": prompts.bad_lines}
    if not todo:  # a finished batch resumed again: nothing to load the model for
        print(f"prompts: all {len(prompts.items)} already in {manifest}", flush=True)
        metrics = {"status": "ok", "model": cfg.model.name, **counts, **outputs(manifest), "versions": versions()}
        write_json(out_dir / "metrics.json", metrics)
        return metrics
    asm = assemble(cfg, call_shapes=[(i.height, i.width, 1) for i in todo])
    asm.pipe.set_progress_bar_config(disable=True)  # the bar is over prompts, not steps
    reset_peak_memory(asm.device)
    loras = LoraScales(cfg)
    seconds, rates, failed = [], [], []
    for item in tqdm(todo, desc="prompts", unit="prompt", initial=len(prompts.items) - len(todo),
                     total=len(prompts.items)):
        loras.apply(asm.pipe, item)
        settings = Settings(height=item.height, width=item.width, steps=item.steps, guidance=item.guidance,
                            seeds=[item.seed], prompt=item.prompt, negative_prompt=item.negative_prompt)
        try:
            result = generate(asm, settings)
        except NonFiniteError as err:  # one broken line must not cost the rest of the batch
            print(f"onediffx: warning: prompts line {item.line}: {err}", file=sys.stderr, flush=True)
            failed.append({"line": item.line, "index": item.index, "error": str(err), "step": err.step})
            continue
        saved = save_png(result.images[0], out_dir / item.file)
        append_manifest(manifest, {**item.spec(), "line": item.line, "file": item.file, **saved,
                                   "seconds": result.seconds})
        seconds.append(result.seconds)
        rates.append(item.steps / result.seconds)
        if len(seconds) == 1:
            print_startup(cfg, asm, result.seconds)

    asm.close()
    median = statistics.median(seconds) if seconds else None
    metrics = {
        "status": "failed" if failed else "ok",
        **job_facts(cfg, asm),
        **counts,
        "failed_lines": failed,
        "calls": len(seconds),
        "seconds_per_call": seconds,
        "median_seconds_per_call": median,
        "latency_per_image_s": median,
        "it_per_s": statistics.median(rates) if rates else None,
        "peak_memory_gib": peak_memory_gib(asm.device),
        **outputs(manifest),
        "versions": versions(),
    }
    write_json(out_dir / "metrics.json", metrics)
    if failed:  # the others are written and recorded; resume=true retries only the failed lines
        lines = ", ".join(str(f["line"]) for f in failed[:5]) + (" ..." if len(failed) > 5 else "")
        raise NonFiniteError(f"prompts: {len(failed)} of {len(todo)} lines failed (lines {lines}): {failed[0]['error']}; "
                             f"see {out_dir / 'metrics.json'}", step=failed[0]["step"])
    say_done(out_dir, [item.file for item in todo], median)
    return metrics
