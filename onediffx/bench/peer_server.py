"""The serving peer: a plain diffusers FastAPI server, as diffusers' docs would have one written.

    python -m onediffx.bench.peer_server --arch sdxl --port 8001 --lora l1=/path/l1.safetensors \
        --compile --warm '[{"size": "1024x1024", "loras": {"l1": 1.0}}]'

One pipeline, the UNet ``torch.compile``d in place (channels-last as in diffusers' torch.compile guide;
``dynamic=False``: one static graph per size, where the default recompiles the second size as a
dynamic graph that then serves every size) after the LoRAs are loaded with ``load_lora_weights``; one request
at a time (a lock), the call in a thread so ``/readyz`` still answers. LoRAs are fused (the best a
plain diffusers server does: a request for other LoRA weights unfuses, ``set_adapters`` and
``fuse_lora`` again, and the compiled UNet runs no adapter branches); ``--lora-mode adapters``
keeps PEFT's unfused adapters and switches with ``set_adapters`` alone. It speaks the same subset
of the images API as ``onediffx serve``, so one client drives both.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import signal
import time
from typing import Any, AsyncIterator, Optional

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field


class PeerRequest(BaseModel):
    prompt: str
    n: int = Field(1, ge=1, le=16)
    size: str = "1024x1024"
    seed: int = 0
    steps: int = Field(30, ge=1, le=500)
    guidance: float = 7.5
    negative_prompt: Optional[str] = None
    loras: Optional[dict[str, float]] = None
    response_format: str = "b64_json"


def build(args: argparse.Namespace) -> Any:
    from .peer_start import plain_pipeline

    pipe, _ = plain_pipeline(args.arch, args.builtin)
    for spec in args.lora:
        name, path = spec.split("=", 1)
        pipe.load_lora_weights(path, adapter_name=name)
    if args.compile:
        pipe.unet.to(memory_format=torch.channels_last)
        # in place (``nn.Module.compile``): ``pipe.unet = torch.compile(pipe.unet)`` swaps in an
        # ``OptimizedModule``, which diffusers' ``fuse_lora``, ``unfuse_lora`` and ``set_adapters`` skip
        # (not a ``ModelMixin``): the UNet kept its unfused adapters and ignored every switch
        pipe.unet.compile(mode=args.mode, fullgraph=True, dynamic=False)
    return pipe


class Peer:
    def __init__(self, pipe: Any, names: list[str], fuse: bool = True) -> None:
        self.pipe, self.names, self.fuse = pipe, names, fuse
        self.current: Optional[tuple[float, ...]] = None

    def _set_loras(self, weights: tuple[float, ...]) -> None:
        if not self.fuse:
            self.pipe.set_adapters(self.names, list(weights))
            return
        if self.current is not None:
            self.pipe.unfuse_lora()
        chosen = [(n, w) for n, w in zip(self.names, weights) if w != 0.0]
        if not chosen:  # unfused adapters still active would run their branches
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters([n for n, _ in chosen], [w for _, w in chosen])
        self.pipe.fuse_lora(adapter_names=[n for n, _ in chosen])

    def __call__(self, req: PeerRequest) -> list[bytes]:
        width, height = (int(v) for v in req.size.split("x"))
        start = time.perf_counter()
        if self.names:
            weights = tuple(float((req.loras or {}).get(n, 0.0)) for n in self.names) if req.loras is not None \
                else tuple(1.0 for _ in self.names)
            if weights != self.current:
                self._set_loras(weights)
                self.current = weights
        switched = time.perf_counter()
        generators = [torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.n)]
        images = self.pipe(prompt=[req.prompt] * req.n, negative_prompt=[req.negative_prompt] * req.n
                           if req.negative_prompt else None, height=height, width=width,
                           num_inference_steps=req.steps, guidance_scale=req.guidance, generator=generators).images
        # one line a call: where a GPU call's time went when its load levels are cut short
        print(f"peer: {req.size} x{req.n}, {req.steps} steps, loras {req.loras}: switch {switched - start:.2f} s, "
              f"call {time.perf_counter() - switched:.2f} s", flush=True)
        out = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(buf.getvalue())
        return out


def create_app(args: argparse.Namespace) -> FastAPI:
    state: dict[str, Any] = {"peer": None}
    lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.get_running_loop().run_in_executor(None, load)
        yield
        await loading

    app = FastAPI(title="diffusers peer", lifespan=lifespan)

    def load() -> None:
        started = time.perf_counter()
        pipe = build(args)
        peer = Peer(pipe, [spec.split("=", 1)[0] for spec in args.lora], fuse=args.lora_mode == "fuse")
        for warm in json.loads(args.warm or "[]"):  # compile every size and LoRA setting before ready
            print(f"peer: warm-up {warm} ({time.perf_counter() - started:.1f} s since start)", flush=True)
            peer(PeerRequest(prompt="warm-up", size=warm["size"], steps=2, loras=warm.get("loras")))
        print(f"peer: ready ({time.perf_counter() - started:.1f} s since start)", flush=True)
        state["peer"] = peer

    @app.get("/readyz")
    async def readyz() -> Any:
        return {"status": "ready"} if state["peer"] else JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/healthz")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.post("/v1/images/generations")
    async def generations(req: PeerRequest) -> Any:
        if state["peer"] is None:
            return JSONResponse({"error": {"message": "loading", "type": "server_error"}}, status_code=503)
        async with lock:  # one request at a time
            pngs = await asyncio.to_thread(state["peer"], req)
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(p).decode("ascii"), "seed": req.seed + i} for i, p in enumerate(pngs)]}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sdxl")
    parser.add_argument("--builtin", default=None)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--lora", action="append", default=[], help="name=path.safetensors, repeatable")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune")
    parser.add_argument("--lora-mode", choices=("fuse", "adapters"), default="fuse",
                        help="fuse the requested LoRAs (default) or switch PEFT's unfused adapters")
    parser.add_argument("--warm", default=None, help='JSON list of {"size": "WxH", "loras": {...}} to run before ready')
    args = parser.parse_args()
    server = uvicorn.Server(uvicorn.Config(create_app(args), host="127.0.0.1", port=args.port, log_level="warning"))
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal after draining: exit 0 instead
        signal.signal(sig, lambda *_: None)
    server.run()


if __name__ == "__main__":
    main()
