"""One home per derived value: the run's size and steps come from ``Settings.from_config``, a LoRA's
adapter name from ``LoraStack``; every caller gets the same answer."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from onediffx.commands.batch.prompts import parse_line
from onediffx.commands.batch.runner import LoraScales
from onediffx.bench import cold_start
from onediffx.bench import serve as serve_bench
from onediffx.config.schema import LoraEntry, LoraStack, RunConfig
from onediffx.generate import Settings
from onediffx.resolver import _call_shapes
from onediffx.serve.engine import limits_of
from onediffx.serve.replicas import lora_stack


@pytest.mark.parametrize("overrides, size, steps", [((), (64, 64), 10), (("height=128", "steps=3"), (128, 64), 3)])
def test_every_caller_takes_the_runs_size_from_settings(compose_run, overrides, size, steps):
    run = compose_run("model=tiny", *overrides)
    settings = Settings.from_config(run)
    assert (settings.height, settings.width, settings.steps) == (*size, steps)
    assert _call_shapes(run)[0] == (*size, 1)
    assert [o for o in cold_start._model_overrides(run) if o.split("=")[0] in ("height", "width", "steps")] == [
        f"height={size[0]}", f"width={size[1]}", f"steps={steps}"]
    script = cold_start._script("m", run)
    assert script[script.index("--height") + 1:script.index("--height") + 6:2] == [str(size[0]), str(size[1]), str(steps)]
    item = parse_line('{"prompt": "a"}', 0, 1, run)
    assert (item.height, item.width, item.steps) == (*size, steps)
    assert parse_line('{"prompt": "a", "height": 256}', 0, 1, run).height == 256  # a line's own value wins

    bench = compose_run("model=tiny", "model.synthetic=false", *overrides, config_name="bench")
    assert serve_bench._sizes(bench)[0] == size
    served = compose_run("model=tiny", *overrides, config_name="serve")
    limits = limits_of(served)
    assert (limits.default_size, limits.default_steps) == (f"{size[1]}x{size[0]}", steps)


def test_a_loras_adapter_name_is_resolved_once_for_every_caller():
    cfg = OmegaConf.structured(RunConfig)
    cfg.lora["first"] = LoraEntry(source="a.safetensors", scale=0.5)
    cfg.lora["second"] = {"source": "b.safetensors", "adapter_name": "custom"}  # a plain mapping, as from the CLI
    stack = LoraStack.from_config(cfg.lora)
    assert {k: e.adapter_name for k, e in stack.entries.items()} == {"first": "first", "second": "custom"}
    assert lora_stack(cfg) == (["first", "second"], ["first", "custom"], (0.5, 1.0))
    assert LoraScales(cfg).entries == [("first", "first", 0.5), ("second", "custom", 1.0)]
    assert cfg.lora.first.adapter_name is None  # the config itself is left as composed
