"""Every outside JSON and ``.npy`` reader against hostile files (issue 35, defects 3, 7, 8, 9, 11, 12).

One property runs through all of them: a depth bomb (100,000 nested ``[``), a size bomb (more
bytes than the reader allows), wrong-typed JSON and non-UTF-8 bytes each give one line naming the
file and the limit, never a traceback; a graph cache entry is quarantined and the next start works;
a damaged batch journal line is reported and its item redone. The CLI path is a real subprocess
where it is the user's path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from conftest import run_cli
from onediffx.bounded import MAX_DEPTH, BoundedInputError, depth, parse_json, read_json
from onediffx.commands.batch.journal import read_manifest
from onediffx.commands.batch.prompts import read_prompts
from onediffx.errors import ConfigError
from onediffx.graph_cache.manifest import MAX_MANIFEST_BYTES
from onediffx.graph_cache.store import QUARANTINE
from onediffx.instantid.face import FaceError, load_face
from onediffx.lora import LoraFormatError
from onediffx.lora.formats import _lora_configs
from onediffx.lora.sources import MAX_PEFT_CONFIG, RawLora, read_lora
from onediffx.lora.synthetic import lora_targets, random_lora, save_kohya
from onediffx.models.tiny import tiny_sdxl
from onediffx.serve.schemas import Limits, request_model
from test_graph_cache_hardening import BLOBS, KEY, SIGNATURES, _cache, _warnings, key_file, saved  # noqa: F401

DEEP = b"[" * 100_000 + b"]" * 100_000


def bombs(max_bytes: int, expect: str = "object") -> dict[str, tuple[bytes, str]]:
    """Each hostile content, with the words its one-line error must hold (the depth bomb as deep as
    fits under ``max_bytes``, so it is its depth that is refused, not its size)."""
    levels = min(100_000, max_bytes // 2)
    return {
        "depth": (b"[" * levels + b"]" * levels, f"JSON nested too deeply ({levels} levels; at most {MAX_DEPTH} allowed)"),
        "size": (b'{"a": "' + b"x" * max_bytes + b'"}', f"more than the {max_bytes} allowed"),
        "wrong_type": (b'"just a string"', f"expected a JSON {expect}, got string"),
        "non_utf8": (b'{"a": "caf\xe9"}', "not UTF-8 text (byte 11)"),
    }


def _one_line(message: str, *parts: str) -> None:
    assert "\n" not in message and "Traceback" not in message, message
    for part in parts:
        assert part in message, (part, message)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


# -- the reader itself -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(bombs(1 << 20)))
def test_the_reader_refuses_each_bomb_in_one_line(tmp_path, case):
    data, words = bombs(1 << 20)[case]
    path = tmp_path / "x.json"
    path.write_bytes(data)
    with pytest.raises(BoundedInputError) as err:
        read_json(path, dict, max_bytes=1 << 20)
    _one_line(str(err.value), str(path), words)
    assert err.value.where == str(path) and str(err.value) == f"{path}: {err.value.reason}"


def test_depth_is_counted_outside_strings_and_without_recursion():
    assert depth(b'[[1, "]]]]"], {"a": [2, "[[[["]}]') == 3
    assert depth(b'["\\"[[[", [[]]]') == 3  # an escaped quote does not end the string
    assert depth(DEEP * 3) == 100_000
    assert depth(b'["' + b'\\"[' * 500_000) == 1  # an unterminated string: one linear pass, not one per quote
    assert parse_json(b'{"a": [[1]]}', "x", dict, max_bytes=100) == {"a": [[1]]}
    assert parse_json("[1, 2]", "x", (dict, list), max_bytes=100) == [1, 2]


@pytest.mark.parametrize("data, words", [
    (b'[1' + b"0" * 5000 + b"]", "not valid JSON (Exceeds the limit (4300 digits)"),
    (b'{"a": 1', "not valid JSON (Expecting ',' delimiter at line 1 column 8)"),
    (b"[" * 10 + b"}" * 10, "not valid JSON"),
])
def test_invalid_json_is_one_line(data, words):
    with pytest.raises(BoundedInputError) as err:
        parse_json(data, "f.json", list, max_bytes=1 << 20)
    _one_line(str(err.value), "f.json: ", words)


# -- graph cache manifests (defect 3) --------------------------------------------------------------


@pytest.mark.parametrize("case", list(bombs(MAX_MANIFEST_BYTES)))
def test_a_bad_manifest_is_quarantined_and_the_next_start_works(saved, key_file, caplog, case):  # noqa: F811
    root, entry = saved
    data, words = bombs(MAX_MANIFEST_BYTES)[case]
    (entry / "manifest.json").write_bytes(data)
    neighbour = root / "unet" / ("0" * 20)  # read by _explain_miss for another key
    neighbour.mkdir()
    (neighbour / "manifest.json").write_bytes(data)
    cache = _cache(root, key_file)
    with caplog.at_level(logging.WARNING, logger="onediffx.graph_cache"):
        assert cache.load("unet", {**KEY, "k": 3}) is None and cache.last_miss == "absent"  # the neighbours explain nothing
        assert cache.load("unet", KEY) is None and cache.last_miss == "corrupt"
    (quarantined,) = (root / QUARANTINE).iterdir()
    assert (quarantined / "manifest.json").read_bytes() == data  # the evidence is kept
    (message,) = [m for m in _warnings(caplog) if "unusable" in m]
    _one_line(message, str(entry), "manifest.json", words, str(quarantined))
    assert _cache(root, key_file).save("unet", KEY, BLOBS, SIGNATURES) == entry
    assert _cache(root, key_file).load("unet", KEY).blobs == BLOBS


# -- LoRA metadata and PEFT configs (defect 9) -----------------------------------------------------


@pytest.mark.parametrize("text, words", [
    ("[1, 2]", "expected a JSON object, got array"),
    ('"rank 4"', "expected a JSON object, got string"),
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    ('{"unet.lora_alpha": "eight"}', "lora_alpha 'eight' is not a finite number"),
    ('{"alpha_pattern": [1]}', "alpha_pattern is not a map"),
])
def test_bad_lora_adapter_metadata_is_one_lora_error(text, words):
    with pytest.raises(LoraFormatError) as err:
        _lora_configs(RawLora({}, "my.safetensors", {"lora_adapter_metadata": text}))
    _one_line(str(err.value), "LoRA my.safetensors: ", words)


@pytest.fixture(scope="module")
def lora_tensors(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("lora") / "k.safetensors"
    save_kohya(random_lora(lora_targets(tiny_sdxl(), components=("unet",)), 4, seed=1), path)
    return load_file(str(path))


@pytest.mark.parametrize("case", list(bombs(MAX_PEFT_CONFIG)))
def test_a_bad_peft_config_is_one_lora_error(tmp_path, lora_tensors, case):
    import torch

    data, words = bombs(MAX_PEFT_CONFIG)[case]
    lora = tmp_path / "adapter_model.safetensors"
    save_file(lora_tensors, str(lora))
    (tmp_path / "adapter_config.json").write_bytes(data)
    with pytest.raises(LoraFormatError) as err:
        read_lora(str(lora), torch.device("cpu"))
    _one_line(str(err.value), f"LoRA {lora}: adapter_config.json: ", words)


@pytest.mark.parametrize("where", ["metadata", "peft_config"])
def test_cli_bad_lora_config_is_one_line_exit_2(tmp_path, lora_tensors, where):
    if where == "metadata":
        lora = tmp_path / "meta.safetensors"
        save_file(lora_tensors, str(lora), metadata={"lora_adapter_metadata": "[1, 2, 3]"})
        words = "lora_adapter_metadata in the file header: expected a JSON object, got array"
    else:
        lora = tmp_path / "adapter_model.safetensors"
        save_file(lora_tensors, str(lora))
        (tmp_path / "adapter_config.json").write_bytes(DEEP)
        words = "adapter_config.json: JSON nested too deeply"
    proc = run_cli("run", "model=tiny_xl", f"+lora.bad.source={lora}", "steps=1", "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = _errors(proc.stderr)
    _one_line(line, str(lora), words)
    assert "Traceback" not in proc.stderr and not list(tmp_path.glob("out/*.png"))


# -- InstantID face files (defect 11) --------------------------------------------------------------


@pytest.fixture
def face_npy(tmp_path) -> Path:
    path = tmp_path / "face.npy"
    np.save(path, np.ones(512, np.float32))
    return path


@pytest.mark.parametrize("case", list(bombs(64 << 10, "object or array")))
def test_a_bad_kps_file_is_one_face_error(tmp_path, face_npy, case):
    data, words = bombs(64 << 10, "object or array")[case]
    kps = tmp_path / "kps.json"
    kps.write_bytes(data)
    with pytest.raises(FaceError) as err:
        load_face(str(face_npy), str(kps))
    _one_line(str(err.value), f"face.kps: {str(kps)!r}: ", words)


def _npy_declaring(path: Path, shape: tuple, descr: str = "<f8") -> Path:
    """A ``.npy`` header declaring ``shape``, with no data behind it (a few hundred bytes on disk)."""
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
    return path


def test_npy_shape_is_checked_from_the_header_before_allocating(tmp_path):
    kps = tmp_path / "kps.json"
    kps.write_text(json.dumps({"kps": [[1, 2]] * 5}))
    huge = _npy_declaring(tmp_path / "huge.npy", (4_000_000_000,))
    assert huge.stat().st_size < 200
    with pytest.raises(FaceError) as err:
        load_face(str(huge), str(kps))
    _one_line(str(err.value), "face.embedding: ", "got shape (4000000000,) of float64")
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array([{"x": 1}] * 512, dtype=object), allow_pickle=True)
    with pytest.raises(FaceError) as err:
        load_face(str(pickled), str(kps))
    _one_line(str(err.value), "got shape (512,) of object")
    short = _npy_declaring(tmp_path / "short.npy", (512,), "<f4")  # a header that promises data it lacks
    with pytest.raises(FaceError) as err:
        load_face(str(short), str(kps))
    _one_line(str(err.value), "is not a numeric .npy array")


@pytest.mark.parametrize("bad", ["npy", "kps"])
def test_cli_bad_face_file_is_one_line_exit_2(tmp_path, face_npy, bad):
    kps = tmp_path / "kps.json"
    kps.write_bytes(bombs(64 << 10)["depth"][0] if bad == "kps" else json.dumps({"kps": [[1, 2]] * 5}).encode())
    npy = _npy_declaring(tmp_path / "huge.npy", (4_000_000_000,)) if bad == "npy" else face_npy
    proc = run_cli("run", "model=tiny_instantid", f"face.embedding={npy}", f"face.kps={kps}", "steps=1",
                   "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = _errors(proc.stderr)
    _one_line(line, "got shape (4000000000,)" if bad == "npy" else "JSON nested too deeply")
    assert "Traceback" not in proc.stderr


# -- batch prompts files (defect 7) ----------------------------------------------------------------


@pytest.mark.parametrize("case, line, words", [
    *[(name, data, words) for name, (data, words) in bombs(1 << 20).items() if name != "non_utf8"],
    ("non_utf8", b'{"prompt": "caf\xe9"}', "not UTF-8 text (byte 16 of the line)"),
    ("scale_1e308", b'{"prompt": "x", "lora_scales": {"a": 1e308}}', "expected an object of LoRA name to a finite number from -100 to 100"),
    ("scale_101", b'{"prompt": "x", "lora_scales": {"a": -101}}', "from -100 to 100"),
])
def test_a_bad_prompts_line_is_one_line_naming_it(compose_run, tmp_path, case, line, words):
    if case == "wrong_type":
        words = "expected a JSON object, got string"
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n' + line + b"\n")
    with pytest.raises(ConfigError) as err:
        read_prompts(compose_run(f"prompts={path}"))
    _one_line(str(err.value), f"prompts: {path} line 2: ", words)


def test_cli_batch_lora_scale_1e308_is_refused_before_any_image(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "x", "lora_scales": {"a": 1e308}}\n')
    proc = run_cli("run", f"prompts={path}", "steps=1", "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = _errors(proc.stderr)
    _one_line(line, f"{path} line 2: lora_scales", "from -100 to 100")
    assert not list(tmp_path.glob("out/*.png"))


# -- the batch journal on resume (defect 8) --------------------------------------------------------

DAMAGED = {
    "index_string": b'{"index": "0", "file": "a.png"}',
    "index_null": b'{"index": null, "file": "a.png"}',
    "index_1e400": b'{"index": 1e400, "file": "a.png"}',
    "index_huge": b'{"index": 100000000000000000000000000000, "file": "a.png"}',
    "index_5000_digits": b'{"index": 1' + b"0" * 5000 + b', "file": "a.png"}',
    "index_bool": b'{"index": true, "file": "a.png"}',
    "no_file": b'{"index": 0}',
    "non_utf8": b'{"index": 0, "file": "\xff.png"}',
    "deep": DEEP,
    "a_list": b"[0]",
}
REASONS = {
    "index_string": "index '0' is not an integer", "index_null": "index None is not an integer",
    "index_1e400": "index inf is not an integer", "index_huge": "is not an integer from 0 to 2147483647",
    "index_5000_digits": "not valid JSON", "index_bool": "index True is not an integer", "no_file": "has no 'file' name",
    "non_utf8": "not UTF-8 text", "deep": "JSON nested too deeply", "a_list": "expected a JSON object, got array",
}


def test_damaged_journal_lines_are_reported_and_skipped(tmp_path):
    journal = tmp_path / "manifest.jsonl"
    journal.write_bytes(b'{"index": 1, "file": "b.png"}\n' + b"\n".join(DAMAGED.values()) + b"\n")
    said: list[str] = []
    assert read_manifest(journal, warn=said.append) == {1: {"index": 1, "file": "b.png"}}
    assert len(said) == len(DAMAGED)
    for number, (name, message) in enumerate(zip(DAMAGED, said), start=2):
        _one_line(message, f"{journal} line {number}: ", REASONS[name], "that item is redone")


def test_cli_resume_on_a_damaged_journal_redoes_the_item(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "seed": 1}\n{"prompt": "b", "seed": 2}\n')
    args = ["run", f"prompts={prompts}", "steps=1", "height=64", "width=64", "hydra.run.dir=out"]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    journal = tmp_path / "out" / "manifest.jsonl"
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [e["index"] for e in entries] == [0, 1]
    # item 0's line is damaged every way at once: only damaged lines are left for it
    journal.write_bytes(b"\n".join(DAMAGED.values()) + b"\n" + json.dumps(entries[1]).encode() + b"\n")
    resumed = run_cli(*args, "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if "resume:" in line and "warning" in line]
    assert len(warnings) == len(DAMAGED) and all("that item is redone" in w for w in warnings)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["generated"] == 1 and metrics["resumed"] == 1
    assert metrics["outputs"] == [entries[0]["file"], entries[1]["file"]]
    assert (tmp_path / "out" / entries[0]["file"]).is_file()


# -- the server's guidance and LoRA scales (defect 12) ----------------------------------------------


@pytest.mark.parametrize("field, value, words", [
    ("guidance", 101, "less than or equal to 100"),
    ("guidance", 1e30, "less than or equal to 100"),
    ("loras", {"a": 1e308}, "loras.a: 1e+308 is not allowed; expected a finite number from -100 to 100"),
    ("loras", {"a": -100.5}, "loras.a: -100.5 is not allowed"),
])
def test_server_requests_are_refused_as_the_cli_refuses(field, value, words):
    model = request_model(Limits())
    assert model(prompt="x", guidance=100, loras={"a": -100}).guidance == 100
    with pytest.raises(ValidationError) as err:
        model(prompt="x", **{field: value})
    assert words in str(err.value)


# -- quantize calibration files ---------------------------------------------------------------------


@pytest.mark.parametrize("layers", [DEEP.decode(), '"ff"', "{}"], ids=["depth", "string", "object"])
def test_a_calibration_file_with_bad_layer_names_is_calibrated_again(tmp_path, layers):
    import torch

    from onediffx.quantize import calibrate as cal

    cal.save(cal.Ranges({"ff": 3.0}, {"ff": 3}, "k1"), tmp_path)
    path = cal.path_for(tmp_path, "k1")
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"format": str(cal.FORMAT), "key": "k1", "layers": layers})
    assert cal.load(tmp_path, "k1") is None
    save_file(tensors, str(path), metadata={"format": str(cal.FORMAT), "key": "k1", "layers": '["ff"]'})
    assert cal.load(tmp_path, "k1").amax == {"ff": 3.0} and isinstance(tensors["amax"], torch.Tensor)
