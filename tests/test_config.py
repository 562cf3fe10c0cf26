"""Composition and validation against the structured configs."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from onediffx.config import validate
from onediffx.errors import ConfigError
from onediffx.resolver import plan


def test_defaults_compose_and_validate(compose_run):
    cfg = compose_run()
    validate(cfg)
    assert cfg.model.name == "tiny" and cfg.compile.backend == "none" and not cfg.deepcache.enabled
    assert list(cfg.stages) == ["quantize", "lora-fuse", "deepcache", "compile", "load-graph", "stepcache", "parallel", "warmup", "save-graph"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("steps=-1", "steps"),
        ("width=100", "width"),
        ("model.steps=0", "model.steps"),
        ("num_images=0", "num_images"),
        ("dtype=float8", "dtype"),
        ("device=tpu", "device"),
        ("warmup.shapes=[{height:60,width:64}]", "warmup.shapes[0].height"),
    ],
)
def test_out_of_range_values_name_their_key(compose_run, override, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ": "):
        validate(compose_run(override))


def test_types_are_checked_at_composition(compose_run):
    from hydra.errors import ConfigCompositionException

    from onediffx.cli import one_line

    with pytest.raises(ConfigCompositionException) as info:
        compose_run("seed=abc")
    assert one_line(info.value) == "seed: Value 'abc' of type 'str' could not be converted to Integer"


@pytest.mark.parametrize("override, message", [
    ("warmup.on_cache_hit=later", "warmup.on_cache_hit: Invalid value 'later', expected one of [skip, run]"),
    ("warmup.unprepared=maybe", "warmup.unprepared: Invalid value 'maybe', expected one of [compile, eager]"),
    ("compile.graph=lazy", "compile.graph: Invalid value 'lazy', expected one of [aot, dynamo]"),
    ("compile.vae_dtype=int8", "compile.vae_dtype: Invalid value 'int8', expected one of [bfloat16, float16, float32]"),
    ("compile.attention=xformers", "compile.attention: Invalid value 'xformers', expected one of [auto, cudnn, flash, default]"),
    ("deepcache.schedule=cubic", "deepcache.schedule: Invalid value 'cubic', expected one of [uniform, nonuniform]"),
    ("on_bad_line=ignore", "on_bad_line: Invalid value 'ignore', expected one of [fail, skip]"),
    ("lora_originals=gpu", "lora_originals: Invalid value 'gpu', expected one of [cpu, device]"),
])
def test_closed_sets_are_enums_checked_at_composition(compose_run, override, message):
    """A value outside a closed set fails while composing, with its key, before anything loads."""
    from hydra.errors import ConfigCompositionException

    from onediffx.cli import one_line

    with pytest.raises(ConfigCompositionException) as info:
        compose_run(override)
    assert one_line(info.value) == message


def test_unknown_stage_fails_before_any_model_loads(compose_run):
    with pytest.raises(ConfigError, match=r"stages\[0\]: unknown stage 'fast'"):
        plan(compose_run("stages=[fast]"))


def test_model_entries_name_allowlisted_pipelines(compose_run):
    from onediffx.models.pipelines import PIPELINES

    for name in ("sd15", "sd21", "sdxl", "sdxl_turbo", "lcm_sdxl", "svd_xt", "controlnet_sd15", "controlnet_sdxl"):
        model = compose_run(f"model={name}").model
        assert model.pipeline in PIPELINES and model.pretrained and model.arch
        OmegaConf.to_object(model)


def test_serve_config_validates_itself_and_parses_replicas_once():
    from onediffx.config.schema import ServeConfig

    assert ServeConfig(replicas="all").replica_count is None and ServeConfig(replicas=" 3 ").replica_count == 3
    with pytest.raises(ConfigError, match=r"^serve\.replicas: 'two' is not allowed; expected a number >= 1 or 'all'$"):
        ServeConfig(replicas="two").validate()
    with pytest.raises(ConfigError, match=r"^serve\.batch_sizes: \[1, 2\] is not allowed; expected sizes from 1 to "
                                          r"serve\.max_batch=4"):
        ServeConfig(batch_sizes=[1, 2]).validate()
    with pytest.raises(ConfigError, match=r"^serve\.port: 70000 is not allowed"):
        ServeConfig(port=70000).validate()
    ServeConfig(batch_sizes=[1, 2, 4], replicas="2").validate()  # a good one passes
