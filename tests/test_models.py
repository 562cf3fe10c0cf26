"""Loading through the real code paths: built-in, save_pretrained folder, missing hub ids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onediffx.commands.run import run_job
from onediffx.errors import NotFoundError
from onediffx.models.tiny import BUILDERS, tiny_sd
from onediffx.resolver import assemble
from PIL import Image


def _image(job_dir):
    metrics = json.loads((job_dir / "metrics.json").read_text())
    return np.asarray(Image.open(job_dir / metrics["outputs"][0]))


def test_saved_folder_gives_the_same_image_as_the_builtin(tmp_path, compose_run):
    folder = tmp_path / "tiny-sd"
    tiny_sd().save_pretrained(folder, safe_serialization=True)
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    run_job(compose_run("steps=3"), tmp_path / "builtin")
    run_job(compose_run("steps=3", f"model.path={folder}"), tmp_path / "from_path")
    builtin, loaded = _image(tmp_path / "builtin"), _image(tmp_path / "from_path")
    assert builtin.std() > 0
    np.testing.assert_array_equal(builtin, loaded)


def test_a_saved_flux_folder_gives_the_same_image_as_the_builtin(tmp_path, compose_run):
    """FLUX's folder (transformer, T5 encoder and the offline T5 tokenizer) loads back as ``model.path``."""
    from onediffx.models.tiny import tiny_flux

    folder = tmp_path / "tiny-flux"
    tiny_flux().save_pretrained(folder, safe_serialization=True)
    common = ["model=tiny_flux", "steps=2"]
    run_job(compose_run(*common), tmp_path / "builtin")
    run_job(compose_run(*common, f"model.path={folder}"), tmp_path / "from_path")
    builtin, loaded = _image(tmp_path / "builtin"), _image(tmp_path / "from_path")
    assert builtin.std() > 0
    np.testing.assert_array_equal(builtin, loaded)


def test_the_offline_t5_tokenizer_pads_truncates_and_closes_like_t5():
    from onediffx.models.tokenizer import offline_t5_tokenizer

    tok = offline_t5_tokenizer()
    ids = tok(["a red fox"], padding="max_length", max_length=16, truncation=True).input_ids[0]
    assert len(ids) == 16 and ids[ids.index(tok.eos_token_id) + 1:] == [tok.pad_token_id] * (16 - ids.index(1) - 1)
    assert tok.batch_decode([ids], skip_special_tokens=True) == ["a red fox"]
    long = tok(["x " * 600], padding="max_length", max_length=512, truncation=True).input_ids[0]
    assert len(long) == 512 and long[-1] == tok.eos_token_id and max(long) < len(tok) == 192


def test_pickle_single_file_is_refused(tmp_path, compose_run):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really")
    with pytest.raises(Exception, match=r"model.path: .* is not a .safetensors file"):
        assemble(compose_run(f"model.path={ckpt}"))


def test_missing_hub_id_names_the_id_and_the_fix(tmp_path, compose_run, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(NotFoundError) as info:
        assemble(compose_run("model=sd15"))
    message = str(info.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message and "hf download" in message
    assert "\n" not in message
    with pytest.raises(NotFoundError, match=r"black-forest-labs/FLUX.1-dev.*hf download"):
        assemble(compose_run("model=flux_dev"))


@pytest.mark.parametrize("name", ["tiny_xl", "tiny_svd", "tiny_controlnet", "tiny_flux", "tiny_sd3"])
def test_every_builtin_family_runs(tmp_path, compose_run, name):
    metrics = run_job(compose_run(f"model={name}", "steps=2"), tmp_path)
    assert metrics["status"] == "ok" and metrics["outputs"]
    frame = np.asarray(Image.open(tmp_path / metrics["outputs"][0]).convert("RGB"))
    assert frame.shape == (64, 64, 3)


def test_every_builtin_has_a_config(compose_run):
    for name in BUILDERS:
        assert compose_run(f"model={name}").model.builtin == name
