"""The stage contract: typed options converted and validated once by ``plan()``, and declared order."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import onediffx.resolver as resolver
from onediffx.compile.config import CompileConfig
from onediffx.errors import ConfigError
from onediffx.quantize.config import QuantizeConfig
from onediffx.registry import STAGES, register_stage
from onediffx.resolver import assemble, plan
from onediffx.stages.base import Stage


@dataclass
class RecorderOptions:
    factor: int = 1
    label: str = "x"

    def validate(self, prefix: str) -> None:
        if self.factor < 1:
            raise ConfigError(f"{prefix}factor: {self.factor} is not allowed; expected an integer >= 1")


@register_stage("test-recorder")
class RecorderStage(Stage[RecorderOptions]):
    """A plugin-style stage that records what the plan hands it."""

    group = "plugin_options.recorder"
    options = RecorderOptions
    after = ("lora-fuse",)
    before = ("warmup",)
    seen: list = []

    def check(self, options: RecorderOptions, cfg) -> None:
        RecorderStage.seen.append(("check", options))

    def enabled(self, asm, options: RecorderOptions) -> bool:
        RecorderStage.seen.append(("enabled", options))
        return True

    def apply(self, asm, options: RecorderOptions) -> None:
        RecorderStage.seen.append(("apply", options))
        asm.note(self.name, product=options.factor * 7, planned=asm.planned("warmup"))


def test_a_plugin_stage_receives_its_typed_options_once(compose_run):
    RecorderStage.seen.clear()
    asm = assemble(compose_run("steps=1", "warmup.runs=0", "stages=[lora-fuse,test-recorder,warmup]",
                               "+plugin_options.recorder.factor=3", "+plugin_options.recorder.label=y"))
    assert [what for what, _ in RecorderStage.seen] == ["check", "enabled", "apply"]
    (first, *rest) = [options for _, options in RecorderStage.seen]
    assert isinstance(first, RecorderOptions) and (first.factor, first.label) == (3, "y")
    assert all(options is first for options in rest)  # converted once, the same object throughout
    assert asm.report["test-recorder"]["product"] == 21 and asm.report["test-recorder"]["planned"] is True
    assert asm.stages == ("lora-fuse", "test-recorder", "warmup")


def test_built_in_stages_receive_their_dataclass(compose_run):
    planned = {stage.name: options for stage, options in plan(compose_run("compile.regions=[ResnetBlock2D]"))}
    assert isinstance(planned["compile"], CompileConfig) and planned["compile"].regions == ["ResnetBlock2D"]
    assert isinstance(planned["quantize"], QuantizeConfig) and planned["quantize"].enabled is False
    assert planned["lora-fuse"].entries == {}


@pytest.mark.parametrize("overrides, message", [
    (["+plugin_options.recorder.factor=0"],
     "plugin_options.recorder.factor: 0 is not allowed; expected an integer >= 1"),
    (["+plugin_options.recorder.factor=abc"], "plugin_options.recorder.factor: Value 'abc'"),
    (["+plugin_options.recorder.nope=1"], "plugin_options.recorder.nope: Key 'nope' not in 'RecorderOptions'"),
    (["compile.regions=[1bad]"], "compile.regions: '1bad' is not a class name"),
    (["quantize.min_features=0"], "quantize.min_features=0 must be >= 1"),
    (["deepcache=i3", "deepcache.cache_interval=0"], "deepcache.cache_interval=0 must be >= 1"),
])
def test_a_bad_option_fails_before_the_model_loads(compose_run, monkeypatch, overrides, message):
    loads = []
    monkeypatch.setattr(resolver, "load_pipeline", lambda *a, **k: loads.append(a))
    cfg = compose_run("stages=[quantize,lora-fuse,deepcache,test-recorder,compile]", *overrides)
    with pytest.raises(ConfigError) as err:
        assemble(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert loads == []


@pytest.mark.parametrize("stages, first, later", [
    ("[warmup,compile]", "compile", "warmup"),
    ("[compile,save-graph,warmup]", "warmup", "save-graph"),
    ("[load-graph,compile]", "compile", "load-graph"),
    ("[lora-fuse,quantize]", "quantize", "lora-fuse"),
    ("[warmup,test-recorder]", "test-recorder", "warmup"),  # a plugin's ``before``
    ("[test-recorder,lora-fuse]", "lora-fuse", "test-recorder"),
])
def test_plan_refuses_a_list_out_of_order(compose_run, stages, first, later):
    with pytest.raises(ConfigError) as err:
        plan(compose_run(f"stages={stages}"))
    assert str(err.value).startswith(f"stages: '{later}' must come after '{first}'")
    assert f"list {first} before {later}" in str(err.value)


def test_the_default_list_keeps_every_declared_order(compose_run):
    names = [stage.name for stage, _ in plan(compose_run())]
    assert names == ["quantize", "lora-fuse", "deepcache", "compile", "load-graph", "stepcache", "parallel", "warmup", "save-graph"]
    for name in names:
        for first in STAGES[name].after:
            assert names.index(first) < names.index(name)
