"""A face for InstantID: its 512-d identity embedding and five key points, and their drawing.

Two ways in. ``load_face`` reads what ``write_face`` saved (``face.npy``: the embedding, read with
``allow_pickle=False``; ``kps.json``: the key points and the size of the photo they were found in),
which is what tests and benchmarks use. ``detect_face`` runs insightface's antelopev2 models on a
photo and keeps the largest face, as InstantID's authors do. ``draw_kps`` draws the key points as
the IdentityNet was trained to see them: four coloured limbs from the nose to the eyes and mouth
corners, at 60% brightness, and five dots, on a black canvas.

Run as ``python -m onediffx.instantid.face photo.jpg out_dir --models-dir DIR`` to write
``face.npy`` and ``kps.json`` once, so later runs need neither insightface nor the photo
(``--synthetic out_dir``: a seeded stand-in face for benchmarks).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..bounded import BoundedInputError, read_json
from ..errors import ConfigError, NotAvailableError, NotFoundError, OnediffxError

EMBEDDING_DIM = 512
NUM_KPS = 5
KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
"""Right eye, left eye, nose, right and left mouth corner: the order insightface returns them in."""
MAX_KPS_BYTES = 64 << 10
"""Five points and a size: a few hundred bytes; more is not a key points file."""
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
"""Each key point joined to the nose."""


class FaceError(ConfigError):
    """A face input InstantID cannot use: no face in the photo, a wrong embedding shape, bad key points."""


@dataclass(frozen=True)
class Face:
    """One face: the recogniser's embedding and the key points in the pixels of a ``width`` x ``height`` photo."""

    embedding: np.ndarray
    kps: np.ndarray
    width: Optional[int] = None
    height: Optional[int] = None

    def kps_for(self, width: int, height: int) -> np.ndarray:
        """The key points on a ``width`` x ``height`` canvas (the photo stretched to it, as ``resize`` would)."""
        if not self.width or not self.height:
            return self.kps
        return self.kps * np.array([width / self.width, height / self.height])


def check_embedding(value: Any, where: str) -> np.ndarray:
    """The embedding as float32 of shape (512,), or a ``FaceError`` naming ``where``."""
    array = np.asarray(value)
    if _wrong_embedding(array.shape, array.dtype) or not np.isfinite(array).all():
        raise _embedding_error(array.shape, array.dtype, where)
    return array.reshape(EMBEDDING_DIM).astype(np.float32)


def _wrong_embedding(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    return dtype.hasobject or dtype.kind not in "fiu" or len(shape) > 2 or math.prod(shape) != EMBEDDING_DIM


def _embedding_error(shape: tuple[int, ...], dtype: np.dtype, where: str) -> FaceError:
    return FaceError(f"{where}: the face embedding must be {EMBEDDING_DIM} finite numbers (shape (512,) or (1, 512)), "
                     f"got shape {str(tuple(shape))[:80]} of {dtype}; write one with python -m onediffx.instantid.face")


def check_kps(value: Any, where: str) -> np.ndarray:
    """Five finite (x, y) points as float64 (5, 2), or a ``FaceError`` naming ``where``."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.zeros((0,))
    if array.shape != (NUM_KPS, 2) or not np.isfinite(array).all():
        raise FaceError(f"{where}: the key points must be five [x, y] pairs (eyes, nose, mouth corners), "
                        f"got {str(value)[:60]}")
    return array


def _npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a ``.npy`` header declares, read without touching the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not one numpy.save writes for numbers")
    return shape, dtype


def _read_embedding(embedding: str) -> np.ndarray:
    """``face.npy`` without pickles, its declared shape checked from the header BEFORE anything is
    allocated: a header may declare 4e9 elements in a 100-byte file."""
    where = f"face.embedding: {embedding!r}"
    try:
        with open(Path(embedding).expanduser(), "rb") as f:
            shape, dtype = _npy_header(f)
            if _wrong_embedding(shape, dtype):
                raise _embedding_error(shape, dtype, where)
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError) as err:
        raise FaceError(f"{where} is not a numeric .npy array ({str(err).splitlines()[0][:120]}); "
                        "save it with numpy.save") from None


def load_face(embedding: str, kps: str) -> Face:
    """Read ``face.npy`` and ``kps.json``; each problem is one ``FaceError``/``NotFoundError`` line."""
    for key, path in (("face.embedding", embedding), ("face.kps", kps)):
        if not Path(path).expanduser().is_file():
            raise NotFoundError(f"{key}: {path!r} does not exist")
    vector = _read_embedding(embedding)
    try:
        data = read_json(Path(kps).expanduser(), (dict, list), max_bytes=MAX_KPS_BYTES, where=f"face.kps: {kps!r}")
    except BoundedInputError as err:
        raise FaceError(f'{err}; write {{"kps": [[x, y], ...], "width": W, "height": H}}') from None
    points = data.get("kps") if isinstance(data, dict) else data
    size = data if isinstance(data, dict) else {}
    width, height = size.get("width"), size.get("height")
    for key, value in (("width", width), ("height", height)):
        if value is not None and not (isinstance(value, int) and value > 0):
            raise FaceError(f"face.kps: {key}={value!r} in {kps!r} must be a positive integer (the photo's size)")
    return Face(check_embedding(vector, "face.embedding"), check_kps(points, "face.kps"), width, height)


def _antelope_root(models_dir: str) -> Path:
    """insightface's ``root`` (it reads ``<root>/models/antelopev2``) for any of the three usual folders."""
    path = Path(models_dir).expanduser()
    for root in (path, path.parent, path.parent.parent):
        if (root / "models" / "antelopev2").is_dir() and any((root / "models" / "antelopev2").glob("*.onnx")):
            return root
    raise NotFoundError(f"face.models_dir: no antelopev2 models (*.onnx) in {models_dir!r}; download insightface's "
                        "antelopev2 into <dir>/models/antelopev2, or give face.embedding and face.kps instead")


@lru_cache(maxsize=4)
def _analyser(root: str) -> Any:
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name="antelopev2", root=root, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_size=(640, 640))
    return app


def detect_face(image: str, models_dir: str) -> Face:
    """The largest face in the photo ``image``, found by insightface's antelopev2 models."""
    from PIL import Image

    try:
        import insightface  # noqa: F401
    except ImportError as err:
        raise NotAvailableError("face.image: insightface is not installed (pip install insightface onnxruntime); "
                                "or give face.embedding=face.npy face.kps=kps.json instead") from err
    root = _antelope_root(models_dir)
    if not Path(image).expanduser().is_file():
        raise NotFoundError(f"face.image: {image!r} does not exist")
    photo = Image.open(Path(image).expanduser()).convert("RGB")
    faces = _analyser(str(root)).get(np.asarray(photo)[:, :, ::-1].copy())  # insightface reads BGR
    if not faces:
        raise FaceError(f"face.image: no face found in {image!r}; use a photo with one clearly visible face")
    face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
    return Face(check_embedding(face.embedding, "face.image"), check_kps(face.kps, "face.image"), *photo.size)


@lru_cache(maxsize=8)
def _face_from(image: Optional[str], models_dir: Optional[str], embedding: Optional[str], kps: Optional[str]) -> Face:
    if image is not None:
        return detect_face(image, models_dir or "")
    if embedding is None or kps is None:
        raise FaceError("face: InstantID needs a face; give face.embedding=face.npy and face.kps=kps.json, "
                        "or face.image with face.models_dir")
    return load_face(embedding, kps)


def face_from_config(face: Any) -> Face:
    """The face the ``face`` group names (read once per process for the same files)."""
    return _face_from(face.image, face.models_dir, face.embedding, face.kps)


def synthetic_face(seed: int = 0, width: int = 1024, height: int = 1024) -> Face:
    """A seeded stand-in for benchmarks: a random embedding of a recogniser's typical norm (about 22),
    and key points where a centred, upright face would have them."""
    rng = np.random.default_rng(seed)
    kps = np.array([[0.38, 0.42], [0.62, 0.42], [0.50, 0.55], [0.40, 0.68], [0.60, 0.68]]) * [width, height]
    return Face(rng.standard_normal(EMBEDDING_DIM).astype(np.float32), kps, width, height)


def save_face(face: Face, out_dir: str) -> tuple[Path, Path]:
    """Write ``face.npy`` and ``kps.json`` (what ``face.embedding`` and ``face.kps`` read) into ``out_dir``."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    npy, kps = out / "face.npy", out / "kps.json"
    np.save(npy, face.embedding, allow_pickle=False)
    kps.write_text(json.dumps({"kps": face.kps.tolist(), "width": face.width, "height": face.height}), encoding="utf-8")
    return npy, kps


def write_face(image: str, out_dir: str, models_dir: str) -> tuple[Path, Path]:
    """Detect the largest face in ``image`` and write ``face.npy`` and ``kps.json`` into ``out_dir``."""
    return save_face(detect_face(image, models_dir), out_dir)


def _ellipse(center: tuple[float, float], half_length: float, half_width: float, angle: float) -> list[tuple[float, float]]:
    """Points of a rotated ellipse, one per degree (a limb between two key points)."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    points = []
    for deg in range(0, 360):
        t = math.radians(deg)
        x, y = half_length * math.cos(t), half_width * math.sin(t)
        points.append((center[0] + x * c - y * s, center[1] + x * s + y * c))
    return points


def draw_kps(size: Any, kps: Sequence[Sequence[float]], colors: Sequence[tuple[int, int, int]] = KPS_COLORS,
             stick_width: int = 4, radius: int = 10) -> Any:
    """The IdentityNet's condition image: the five key points on a black canvas of ``size``.

    ``size`` is ``(width, height)`` or a PIL image (its size is used, as the reference does).
    """
    from PIL import Image, ImageDraw

    width, height = size.size if hasattr(size, "size") and not isinstance(size, tuple) else size
    points = check_kps(kps, "draw_kps")
    limbs = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(limbs)
    for a, b in LIMBS:
        (xa, ya), (xb, yb) = points[a], points[b]
        length = math.hypot(xa - xb, ya - yb)
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        draw.polygon(_ellipse(((xa + xb) / 2, (ya + yb) / 2), length / 2, stick_width, angle), fill=colors[a])
    canvas = Image.fromarray((np.asarray(limbs, dtype=np.float64) * 0.6).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for (x, y), color in zip(points, colors):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)
    return canvas


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write face.npy and kps.json: ``photo.jpg out_dir --models-dir DIR``, or ``--synthetic out_dir``."""
    parser = argparse.ArgumentParser(prog="python -m onediffx.instantid.face", description=main.__doc__)
    parser.add_argument("paths", nargs="+", metavar="[photo.jpg] out_dir")
    parser.add_argument("--models-dir", help="folder with insightface's antelopev2 models (for a photo)")
    parser.add_argument("--synthetic", action="store_true", help="a seeded stand-in face for benchmarks (no photo)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.synthetic:
            npy, kps = save_face(synthetic_face(args.seed), args.paths[-1])
        elif len(args.paths) != 2 or not args.models_dir:
            parser.error("give photo.jpg out_dir --models-dir DIR, or --synthetic out_dir")
        else:
            npy, kps = write_face(args.paths[0], args.paths[1], args.models_dir)
    except OnediffxError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"wrote {npy} and {kps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
