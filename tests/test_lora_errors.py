"""Bad LoRAs: each is refused with one line naming the file and the reason, and no weight moves."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

import onediffx.lora as lora
from onediffx.errors import NotFoundError, OnediffxError
from onediffx.lora import LoraFormatError, LoraMismatchError, LoraNotFoundError
from onediffx.lora.fuse import state_of
from onediffx.lora.synthetic import kohya_state_dict, lora_targets, random_lora, save_kohya
from onediffx.models.tiny import tiny_sd, tiny_sdxl


def snapshot(pipe) -> dict:
    return {(c, n): p.detach().clone() for c in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None for n, p in getattr(pipe, c).named_parameters()}


@pytest.fixture
def fused_sdxl(tmp_path):
    """A tiny SDXL with one good LoRA already fused: a failed load must not touch that either."""
    pipe = tiny_sdxl()
    good = save_kohya(random_lora(lora_targets(pipe), 4, seed=1), tmp_path / "good.safetensors")
    lora.load_and_fuse_lora(pipe, str(good), "good", lora_scale=0.5)
    return pipe


class Evil:
    """Unpickling this creates a file: proof of whether anything unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _sd15_lora(tmp_path):
    sd = tiny_sd()
    return save_kohya(random_lora(lora_targets(sd), 4, seed=2), tmp_path / "sd15_style.safetensors",
                      te_prefixes=("lora_te_", ""))


def _truncated(tmp_path):
    path = save_kohya(random_lora(lora_targets(tiny_sdxl()), 4, seed=3), tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _text_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("this is not a LoRA\n")
    return path


def _unknown_modules(tmp_path):
    path = tmp_path / "unknown.safetensors"
    save_file({"unet.down_blocks.7.attentions.0.to_q.lora_A.weight": torch.zeros(4, 64),
               "unet.down_blocks.7.attentions.0.to_q.lora_B.weight": torch.zeros(64, 4)}, str(path))
    return path


def _not_lora_keys(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    save_file({"unet.conv_in.weight": torch.zeros(32, 4, 3, 3)}, str(path))
    return path


def _dora(tmp_path):
    state_dict = kohya_state_dict(random_lora(lora_targets(tiny_sdxl(), components=("unet",)), 2, seed=4))
    name = next(k for k in state_dict if k.endswith(".lora_down.weight")).split(".")[0]
    state_dict[f"{name}.dora_scale"] = torch.ones(1, 64)
    path = tmp_path / "dora.safetensors"
    save_file(state_dict, str(path))
    return path


def _rank_mismatch(tmp_path):
    path = tmp_path / "ranks.safetensors"
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{key}.lora_A.weight": torch.zeros(4, 64), f"{key}.lora_B.weight": torch.zeros(64, 8)}, str(path))
    return path


def _pickle_bin(tmp_path):
    path = tmp_path / "style.bin"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, path)
    return path


def _pickle_named_safetensors(tmp_path):
    path = tmp_path / "disguised.safetensors"
    path.write_bytes(pickle.dumps(Evil(tmp_path / "PWNED")))
    return path


CASES = {
    "sd15_lora_on_sdxl": (_sd15_lora, LoraMismatchError, "does not fit"),
    "keys_matching_no_module": (_unknown_modules, LoraMismatchError, "not in this pipeline"),
    "truncated_file": (_truncated, LoraFormatError, "truncated"),
    "not_safetensors": (_text_file, LoraFormatError, "not a readable safetensors"),
    "not_lora_weights": (_not_lora_keys, LoraFormatError, "not LoRA weights"),
    "dora": (_dora, LoraFormatError, "DoRA"),
    "rank_mismatch": (_rank_mismatch, LoraFormatError, "different ranks"),
    "pickle_bin": (_pickle_bin, LoraFormatError, "pickle"),
    "pickle_disguised": (_pickle_named_safetensors, LoraFormatError, "pickle"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_lora_is_refused_and_weights_stay(case, fused_sdxl, tmp_path):
    make, error, reason = CASES[case]
    path = make(tmp_path)
    before = snapshot(fused_sdxl)
    with pytest.raises(error) as info:
        lora.load_and_fuse_lora(fused_sdxl, str(path), "bad", offload_device="cpu")
    message = str(info.value)
    assert isinstance(info.value, OnediffxError)
    assert "\n" not in message and str(path) in message and reason in message, message
    assert all(torch.equal(v, before[k]) for k, v in snapshot(fused_sdxl).items()), "weights changed"
    assert list(state_of(fused_sdxl).adapters) == ["good"]
    assert not (tmp_path / "PWNED").exists(), "something unpickled the file"


def test_missing_sources_say_where_they_looked(tmp_path):
    pipe = tiny_sd()
    with pytest.raises(LoraNotFoundError, match="nowhere.safetensors: no such file"):
        lora.load_and_fuse_lora(pipe, str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(NotFoundError, match=r"someone/some-lora \(style.safetensors\) is not in the local Hugging Face"):
        lora.load_and_fuse_lora(pipe, "someone/some-lora", weight_name="style.safetensors", cache_dir=str(tmp_path))
    (tmp_path / "folder").mkdir()
    torch.save({}, tmp_path / "folder" / "pytorch_lora_weights.bin")
    with pytest.raises(LoraFormatError, match="pickle"):
        lora.load_and_fuse_lora(pipe, str(tmp_path / "folder"))
    assert not state_of(pipe).adapters


def test_hub_id_is_read_from_the_local_cache(tmp_path):
    """A hub id resolves through the HF cache layout, with no network."""
    pipe, reference = tiny_sdxl(), tiny_sdxl()
    layers = random_lora(lora_targets(pipe), 4, seed=5)
    snapshot_dir = tmp_path / "models--someone--style" / "snapshots" / ("0" * 40)
    save_kohya(layers, snapshot_dir / "style.safetensors")
    (tmp_path / "models--someone--style" / "refs").mkdir()
    (tmp_path / "models--someone--style" / "refs" / "main").write_text("0" * 40)
    lora.load_and_fuse_lora(pipe, "someone/style", weight_name="style.safetensors", cache_dir=str(tmp_path))
    lora.load_and_fuse_lora(reference, str(snapshot_dir / "style.safetensors"))
    assert all(torch.equal(v, snapshot(reference)[k]) for k, v in snapshot(pipe).items())


def test_bad_arguments_fail_before_reading(tmp_path):
    pipe = tiny_sd()
    with pytest.raises(ValueError, match="offload_device"):
        lora.load_and_fuse_lora(pipe, str(tmp_path / "x.safetensors"), offload_device="tpu")
    with pytest.raises(ValueError, match="offload_weight"):
        lora.load_and_fuse_lora(pipe, str(tmp_path / "x.safetensors"), offload_weight="both")
    with pytest.raises(TypeError, match="unexpected keyword"):
        lora.load_and_fuse_lora(pipe, str(tmp_path / "x.safetensors"), adapter_weights=[1.0])


def test_lora_on_fused_added_projections_is_refused():
    """Fused added projections (SD3-style ``to_added_qkv``) are not kept in sync: fusing into
    ``add_q_proj`` would change a weight nothing reads. (to_q/k/v are synced: see
    ``test_lora_fused_projections.py``.)"""
    pipe = tiny_sdxl()
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    attn.add_q_proj = torch.nn.Linear(attn.to_q.in_features, attn.to_q.out_features, bias=False)
    prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.add_q_proj"
    state_dict = {f"{prefix}.lora_A.weight": torch.randn(4, attn.to_q.in_features),  # PEFT-format keys
                  f"{prefix}.lora_B.weight": torch.randn(attn.to_q.out_features, 4)}
    attn.fused_projections = True
    before = snapshot(pipe)
    with pytest.raises(LoraMismatchError, match="added projections are fused"):
        lora.load_and_fuse_lora(pipe, state_dict)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(pipe).items())
