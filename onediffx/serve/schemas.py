"""Request and response models of the images API, with the server's limits as their bounds.

OpenAI's ``POST /v1/images/generations`` fields (``prompt``, ``n``, ``size``, ``response_format``)
plus this server's own (``negative_prompt``, ``seed``, ``steps``, ``guidance``, ``loras``,
``deepcache``, ``stream``). The bounds come from ``serve.*`` at start-up (``request_model``), so a
request out of range is a 422 naming the field and the range, and ``/docs`` shows the same ranges.
Every string is literal data: nothing here or downstream interpolates or evaluates it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from ..config.limits import LIMITS, SEED_MAX, problem, text_problem

GUIDANCE = LIMITS["guidance"]
"""The CLI's guidance range: a request is refused as the CLI refuses (``config/limits.py``)."""
SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


@dataclass(frozen=True)
class Limits:
    """What a request may ask for (``serve.*``), fixed when the server starts."""

    max_n: int = 4
    max_steps: int = 200
    max_size: int = 2048
    max_prompt_chars: int = 4000
    max_deepcache: int = 10
    default_size: str = "512x512"
    default_steps: int = 30
    default_guidance: float = 7.5


def parse_size(size: str, max_size: int) -> tuple[int, int]:
    """``"WxH"`` as (width, height); a ``ValueError`` says what is allowed."""
    match = SIZE_RE.match(size)
    if not match:
        raise ValueError(f"size {size!r} is not WIDTHxHEIGHT, e.g. '1024x1024'")
    width, height = int(match.group(1)), int(match.group(2))
    for name, value in (("width", width), ("height", height)):
        if value % 8 or not 8 <= value <= max_size:
            raise ValueError(f"size {size!r}: {name} {value} must be a multiple of 8 between 8 and {max_size}")
    return width, height


class ImageRequestBase(BaseModel):
    """Fields and checks every request model shares; ``request_model`` adds the bounded fields."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("prompt", "negative_prompt", check_fields=False)
    @classmethod
    def _unicode_text(cls, value: Optional[str]) -> Optional[str]:
        """Text that cannot be encoded (a lone surrogate) would fail inside the tokenizer as a 500."""
        problem = text_problem(value, required=False)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("loras", check_fields=False)
    @classmethod
    def _finite_scales(cls, value: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        for name, scale in (value or {}).items():
            message = problem("scale", scale)
            if message:
                raise ValueError(f"loras.{name}: {message}")
        return value


def request_model(limits: Limits) -> type[ImageRequestBase]:
    """The request model with ``limits`` as its bounds (what ``/docs`` shows and 422s enforce)."""

    def _size(cls, value: str) -> str:
        parse_size(value, limits.max_size)
        return value

    fields: dict[str, Any] = dict(
        prompt=(str, Field(min_length=1, max_length=limits.max_prompt_chars,
                           description="What to draw. Literal text: never interpolated or evaluated.")),
        n=(int, Field(1, strict=True, ge=1, le=limits.max_n, description="Images; image i uses seed + i.")),
        size=(str, Field(limits.default_size, description=(
            f"WIDTHxHEIGHT, each a multiple of 8 between 8 and {limits.max_size}."))),
        response_format=(Literal["b64_json"], Field("b64_json", description="Only base64 PNG (b64_json).")),
        model=(Optional[str], Field(None, description="Accepted for OpenAI compatibility; the server has one model.")),
        user=(Optional[str], Field(None, max_length=256, description="Accepted for OpenAI compatibility; unused.")),
        negative_prompt=(Optional[str], Field(None, max_length=limits.max_prompt_chars,
                                              description="What to avoid; literal text.")),
        seed=(int, Field(0, strict=True, ge=0, le=SEED_MAX, description="Noise seed of the first image (CPU generator).")),
        steps=(int, Field(limits.default_steps, strict=True, ge=1, le=limits.max_steps, description="Denoising steps.")),
        guidance=(float, Field(limits.default_guidance, ge=GUIDANCE.low, le=GUIDANCE.high, allow_inf_nan=False,
                               description=f"Classifier-free guidance scale ({GUIDANCE.describe()}).")),
        loras=(Optional[dict[str, float]], Field(None, description=(
            "LoRAs of the preloaded stack to fuse for this request, {name: scale}; names not given are off. "
            "Omitted: the stack at its configured scales."))),
        deepcache=(Optional[int], Field(None, strict=True, ge=1, le=limits.max_deepcache, description=(
            "DeepCache interval (1: off). Omitted: the server's default."))),
        stream=(bool, Field(False, description=(
            "Server-sent events: one 'progress' event per denoising step, then one 'image' event "
            "with the response."))),
    )
    model = create_model("ImageGenerationRequest", __base__=ImageRequestBase,
                         __validators__={"size_check": field_validator("size")(_size)}, **fields)
    return model


class ImageData(BaseModel):
    b64_json: str = Field(description="The PNG, base64-encoded.")
    seed: int = Field(description="The seed this image was drawn with.")


class ImageResponse(BaseModel):
    created: int = Field(description="Unix time the images were made.")
    data: list[ImageData]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "onediffx"
    loras: list[str] = Field(default_factory=list, description="The preloaded LoRAs a request may name.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody
