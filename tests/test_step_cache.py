"""Step caches on the tiny FLUX transformer against diffusers' own hooks applied by hand (the oracle).

The ``stepcache`` stage must do exactly what ``apply_first_block_cache`` / ``apply_taylorseer_cache``
/ ``apply_mag_cache`` do to an identical pipeline: same image, bit for bit. Thresholds are set high so
that the tiny model's steps are really skipped (the cached image differs from the uncached one).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from onediffx.commands.run import run_job
from onediffx.errors import ConfigError
from onediffx.models.tiny import tiny_flux

STEPS = 6
CLI = ["model=tiny_flux", f"steps={STEPS}"]
PROMPT = "a photo of an astronaut riding a horse on the moon"  # the CLI's default


def _oracle_config(kind: str):
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    return {
        "fbc": FirstBlockCacheConfig(threshold=0.5),
        "taylorseer": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                            taylor_factors_dtype=torch.float32),
        "magcache": MagCacheConfig(threshold=0.5, num_inference_steps=STEPS, mag_ratios=FLUX_MAG_RATIOS),
    }[kind]


OVERRIDES = {
    "fbc": ["stepcache=fbc", "stepcache.threshold=0.5"],
    "taylorseer": ["stepcache=taylorseer", "stepcache.cache_interval=2", "stepcache.disable_cache_before_step=1"],
    "magcache": ["stepcache=magcache", "stepcache.threshold=0.5"],
}


def _by_hand(config=None) -> np.ndarray:
    from diffusers.hooks import (FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig, apply_first_block_cache,
                                 apply_mag_cache, apply_taylorseer_cache)

    pipe = tiny_flux()
    pipe.set_progress_bar_config(disable=True)
    apply = {FirstBlockCacheConfig: apply_first_block_cache, TaylorSeerCacheConfig: apply_taylorseer_cache,
             MagCacheConfig: apply_mag_cache}
    if config is not None:
        apply[type(config)](pipe.transformer, config)
    out = pipe(prompt=[PROMPT], height=64, width=64, num_inference_steps=STEPS, guidance_scale=3.5,
               generator=[torch.Generator().manual_seed(0)], output_type="pil")
    return np.asarray(out.images[0], dtype=np.int16)


def _run_image(compose_run, folder, *overrides: str) -> tuple[np.ndarray, dict]:
    metrics = run_job(compose_run(*CLI, *overrides), folder)
    image = np.asarray(Image.open(folder / metrics["outputs"][0]), dtype=np.int16)
    return image, json.loads((folder / "metrics.json").read_text())


@pytest.fixture(scope="module")
def uncached():
    return _by_hand()


@pytest.mark.parametrize("kind", sorted(OVERRIDES))
def test_stage_equals_diffusers_hook_applied_by_hand(compose_run, tmp_path, uncached, kind):
    image, metrics = _run_image(compose_run, tmp_path, *OVERRIDES[kind])
    oracle = _by_hand(_oracle_config(kind))
    assert np.array_equal(image, oracle)
    assert np.abs(oracle - uncached).max() > 0  # the cache skipped something
    assert metrics["stages"]["stepcache"]["kind"] == kind


def test_a_unet_model_is_refused_in_one_line(compose_run):
    from onediffx.resolver import assemble

    with pytest.raises(ConfigError, match=r"^stepcache=fbc: step caches work on transformers .*deepcache=i3") as err:
        assemble(compose_run("model=tiny", "stepcache=fbc"))
    assert "\n" not in str(err.value)


def test_sd3_without_diffusers_cache_support_is_refused_in_one_line(compose_run):
    from onediffx.resolver import assemble

    with pytest.raises(ConfigError, match=r"^stepcache=fbc: SD3Transformer2DModel has no diffusers cache support"):
        assemble(compose_run("model=tiny_sd3", "stepcache=fbc"))


@pytest.mark.parametrize("overrides, match", [
    (["compile=inductor"], r"stepcache=fbc: composes with regional graphs only"),
    (["compile=regional"], r"stepcache=fbc: composes with regional graphs only"),
])
def test_graphs_that_would_trace_the_cache_are_refused_before_loading(compose_run, overrides, match):
    from onediffx.resolver import plan

    with pytest.raises(ConfigError, match=match):
        plan(compose_run(*CLI, "stepcache=fbc", *overrides))


def test_taylorseer_needs_lite_hooks_under_regional_graphs(compose_run):
    from onediffx.resolver import plan

    with pytest.raises(ConfigError, match=r"stepcache=taylorseer: .*stepcache.lite=true"):
        plan(compose_run(*CLI, "stepcache=taylorseer", "compile=regional_aot"))


def test_out_of_range_values_name_the_key(compose_run):
    from onediffx.resolver import plan

    with pytest.raises(ConfigError, match=r"^stepcache.cache_interval=0 must be >= 1"):
        plan(compose_run(*CLI, "stepcache=taylorseer", "stepcache.cache_interval=0"))


@pytest.mark.slow
def test_first_block_cache_wraps_regional_graphs(uncached):
    """Under ``compile=regional_aot`` the cache's hooks wrap each block's graph: the image is the eager
    oracle's, and the compiled blocks were not traced through the cache's decision."""
    from onediffx.compile import compile_options, compile_pipe, compile_state
    from onediffx.step_cache import StepCacheConfig, enable

    pipe = tiny_flux()
    pipe.set_progress_bar_config(disable=True)
    compile_pipe(pipe, "inductor", compile_options("regional_aot", components=["transformer"]))
    enable(pipe, StepCacheConfig(kind="fbc", threshold=0.5), STEPS)
    out = pipe(prompt=[PROMPT], height=64, width=64, num_inference_steps=STEPS, guidance_scale=3.5,
               generator=[torch.Generator().manual_seed(0)], output_type="pil")
    image = np.asarray(out.images[0], dtype=np.int16)
    oracle = _by_hand(_oracle_config("fbc"))
    assert np.abs(image - oracle).max() <= 2 and np.abs(oracle - uncached).max() > 0
    handles = compile_state(pipe).saveable
    assert set(handles) == {"transformer.transformer_blocks.0", "transformer.single_transformer_blocks.0"}
    assert all(h.compiles >= 1 for h in handles.values())


def test_a_multirun_sweep_over_step_caches_runs_each_flux_job(tmp_path):
    """Sweeps work on transformers unchanged: one job per step cache, each with its image and metrics."""
    from conftest import job_dirs, run_cli

    proc = run_cli("run", "-m", "model=tiny_flux", "steps=4", "stepcache=off,fbc", "stepcache.threshold=0.5",
                   "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = job_dirs(tmp_path / "sweep")
    assert len(jobs) == 2 and all(list(job.glob("*.png")) for job in jobs)
    stages = [json.loads((job / "metrics.json").read_text())["stages"] for job in jobs]
    assert sorted(str(s.get("stepcache", {}).get("kind")) for s in stages) == ["None", "fbc"]
