"""Plugins: the first-party vae-tiling stage inserted by name, and unknown plugin names."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from onediffx.errors import ConfigError
from onediffx.generate import Settings, generate
from onediffx.resolver import assemble, plan


def test_vae_tiling_plugin_changes_the_pipeline(compose_run):
    size = ["height=128", "width=128", "steps=2"]
    plain = assemble(compose_run(*size))
    tiled = assemble(compose_run(*size, "plugins=[vae_tiling]", "stages=[lora-fuse,vae-tiling]",
                                 "+plugin_options.vae_tiling.overlap=0.5"))
    assert tiled.pipe.vae.use_tiling and not plain.pipe.vae.use_tiling
    assert tiled.report["vae-tiling"]["overlap"] == 0.5
    a = np.asarray(generate(plain, Settings.from_config(plain.cfg)).images[0])
    b = np.asarray(generate(tiled, Settings.from_config(tiled.cfg)).images[0])
    assert not np.array_equal(a, b)  # decoded in tiles: the seams are blended, not identical
    assert peak_signal_noise_ratio(a, b) > 20  # ...but it is the same picture


def test_plugin_options_are_validated(compose_run):
    with pytest.raises(ConfigError, match="plugin_options.vae_tiling.tile_size"):
        plan(compose_run("plugins=[vae_tiling]", "stages=[vae-tiling]", "+plugin_options.vae_tiling.tile_size=100"))


def test_unknown_plugin_is_one_clear_error(compose_run):
    with pytest.raises(ConfigError, match=r"plugins: unknown plugin 'nope'; available: .*vae_tiling"):
        plan(compose_run("plugins=[nope]"))


def test_the_plugin_stage_gets_typed_options_and_its_declared_order(compose_run):
    ((stage, options),) = plan(compose_run("plugins=[vae_tiling]", "stages=[vae-tiling]",
                                           "+plugin_options.vae_tiling.tile_size=512"))
    assert stage.name == "vae-tiling" and type(options) is stage.options and stage.options.__name__ == "VaeTilingOptions"
    assert (options.tile_size, options.overlap, options.enabled) == (512, 0.25, True)  # the rest from defaults
    with pytest.raises(ConfigError, match=r"^stages: 'warmup' must come after 'vae-tiling' .*list vae-tiling before warmup"):
        plan(compose_run("plugins=[vae_tiling]", "stages=[compile,warmup,vae-tiling]"))
