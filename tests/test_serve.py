"""``onediffx serve``: real uvicorn servers in subprocesses on the tiny model, driven over real HTTP.

The oracle for every image is the batch command (``onediffx run prompts=...``): one pipeline call
per line, the same LoRA stack re-weighted per line. A served image, however it was batched and on
whichever replica, must match its request's line within 2/255.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from onediffx.client import AsyncClient, Client  # noqa: E402

from conftest import REPO, run_cli  # noqa: E402

STEPS = 2
SIZES = ["64x64", "64x48"]
LORA_MIX = [None, {"a": 1.0}, {"a": 0.6, "b": 0.8}, {"b": 1.0}]
PROMPTS = ["a red fox in the snow", "${oc.env:HOME} stays literal", "a {curly} prompt", "an astronaut"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lora_conf(root: Path) -> Path:
    """Two seeded LoRA files for the tiny model and a config folder with one ``lora/<name>.yaml`` each."""
    from onediffx.lora.synthetic import lora_targets, random_lora, save_kohya
    from onediffx.models.tiny import tiny_sd

    targets = lora_targets(tiny_sd())
    conf = root / "conf"
    (conf / "lora").mkdir(parents=True)
    for name, seed, scale in (("a", 1, 1.0), ("b", 2, 0.5)):
        path = save_kohya(random_lora(targets, 4, seed=seed, strength=0.5), root / f"{name}.safetensors",
                          te_prefixes=("lora_te_", ""))
        (conf / "lora" / f"{name}.yaml").write_text(f"# @package lora.{name}\nsource: {path}\nscale: {scale}\n")
    return conf


class Server:
    """``python -m onediffx serve`` in its own process group, in an empty working folder."""

    def __init__(self, root: Path, *overrides: str) -> None:
        self.cwd = root / "cwd"
        self.cwd.mkdir(parents=True)
        self.log = root / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        env.update(PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
                   HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "onediffx", "serve", "model=tiny", "cache.enabled=false",
                 f"serve.port={self.port}", *overrides],
                cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = Client(self.url)

    def wait_ready(self, timeout: float = 240) -> float:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                if self.client.http.get("/readyz").status_code == 200:
                    return timeout - (deadline - time.monotonic())
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server not ready (exit code {self.proc.returncode}):\n{self.log.read_text()[-3000:]}")

    def metrics(self) -> dict[str, float]:
        """Every sample as ``name{label=value,...}`` -> value."""
        out = {}
        for family in text_string_to_metric_families(self.client.metrics()):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_metric(self, name: str, ok, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.metrics().get(name, 0.0)
            if ok(value):
                return value
            time.sleep(0.05)
        raise AssertionError(f"{name} never satisfied the condition; last {self.metrics().get(name)}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.client.close()
        return self.proc.wait()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def conf(root) -> Path:
    return lora_conf(root)


@pytest.fixture(scope="module")
def server(root, conf):
    """Two replicas on the CPU behind one endpoint, LoRA stack [a, b], batches of up to 4 images."""
    srv = Server(root / "main", f"hydra.searchpath=[file://{conf}]", "lora=[a,b]", "serve.replicas=2",
                 "serve.max_batch=4", "serve.batch_wait_ms=300", "serve.max_prompt_chars=200", "steps=2",
                 "serve.batch_sizes=[2,4]")  # calls padded to 2 or 4 images: the oracle test covers padding
    srv.wait_ready()
    yield srv
    srv.stop()


def requests_mix(count: int = 64) -> list[dict]:
    out = []
    for i in range(count):
        body = {"prompt": f"{PROMPTS[i % len(PROMPTS)]} #{i % 5}", "size": SIZES[(i // 2) % 2], "steps": STEPS,
                "seed": 1000 + 7 * i, "n": 2 if i % 8 == 3 else 1}
        if LORA_MIX[(i // 4) % len(LORA_MIX)] is not None:
            body["loras"] = LORA_MIX[(i // 4) % len(LORA_MIX)]
        if i % 16 == 5:
            body["negative_prompt"] = "blurry"
        out.append(body)
    return out


async def drive(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    gate = asyncio.Semaphore(concurrency)
    async with AsyncClient(url) as client:
        async def one(body):
            async with gate:
                return await client.request(body)
        return await asyncio.gather(*(one(b) for b in bodies))


SERVED: dict[str, list[np.ndarray]] = {}
"""Images of the mixed-request test by request body, for the Ray test to compare with."""


def as_array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_batched_mixed_requests_match_the_batch_command(server, root, conf):
    bodies = requests_mix()
    responses = asyncio.run(drive(server.url, bodies, concurrency=8))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text[:200] for r in responses if r.status_code != 200]
    from onediffx.client import decode

    served = [(body, decode(r.json()), [d["seed"] for d in r.json()["data"]]) for body, r in zip(bodies, responses)]
    assert sum(len(images) for _, images, _ in served) == sum(b["n"] for b in bodies)  # none lost

    # The oracle: the batch command, one line per image, the same stack re-weighted per line.
    lines = []
    for body, _, seeds in served:
        width, height = map(int, body["size"].split("x"))
        assert seeds == [body["seed"] + i for i in range(body["n"])]
        for seed in seeds:
            line = {"prompt": body["prompt"], "seed": seed, "height": height, "width": width, "steps": STEPS}
            if "loras" in body:
                line["lora_scales"] = {"a": body["loras"].get("a", 0.0), "b": body["loras"].get("b", 0.0)}
            if "negative_prompt" in body:
                line["negative_prompt"] = body["negative_prompt"]
            lines.append(line)
    work = root / "oracle"
    work.mkdir()
    (work / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = run_cli("run", "prompts=p.jsonl", f"hydra.searchpath=[file://{conf}]", "lora=[a,b]",
                   "cache.enabled=false", "hydra.run.dir=out", cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = [json.loads(t) for t in (work / "out" / "manifest.jsonl").read_text().splitlines()]
    expected = {e["index"]: as_array(Image.open(work / "out" / e["file"])) for e in manifest}
    got = [as_array(image) for _, images, _ in served for image in images]
    SERVED.update({json.dumps(body, sort_keys=True): [as_array(i) for i in images] for body, images, _ in served})
    assert len(expected) == len(got) == len(lines)
    worst = max(int(np.abs(got[i] - expected[i]).max()) for i in range(len(got)))
    assert worst <= 2, f"a served image differs from its request alone by {worst}/255"
    distinct = {a.tobytes() for a in got}
    assert len(distinct) == len(got)  # seeds and LoRAs really differ

    m = server.metrics()
    assert m["onediffx_batch_size_sum"] > m["onediffx_batch_size_count"], "no batch of more than one image formed"
    assert m["onediffx_images_total"] >= len(lines)
    assert m["onediffx_lora_switches_total"] >= 2
    assert m["onediffx_batch_seconds_count{replica=replica0}"] > 0 and m["onediffx_batch_seconds_count{replica=replica1}"] > 0
    assert m["onediffx_queue_depth"] == 0
    # the start's phases by the server's clock: the bench counts the ready target from the weights
    assert 0 < m["onediffx_weights_loaded_time_seconds"] < m["onediffx_ready_time_seconds"] <= time.time()
    assert m["process_start_time_seconds"] < m["onediffx_weights_loaded_time_seconds"]


@pytest.mark.parametrize("body, param, allowed", [
    ({"steps": 0}, "steps", "greater than or equal to 1"),
    ({"steps": 201}, "steps", "less than or equal to 200"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"seed": 2**63}, "seed", "less than or equal to 9223372036854775807"),
    ({"size": "64x60"}, "size", "multiple of 8 between 8 and 2048"),
    ({"size": "4096x64"}, "size", "multiple of 8 between 8 and 2048"),
    ({"size": "big"}, "size", "WIDTHxHEIGHT"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"n": 5}, "n", "less than or equal to 4"),
    ({"guidance": -1}, "guidance", "greater than or equal to 0"),
    ({"guidance": 101}, "guidance", "less than or equal to 100"),
    ({"loras": {"a": 101}}, "loras", "expected a finite number from -100 to 100"),
    ({"prompt": ""}, "prompt", "at least 1 character"),
    ({"prompt": "x" * 201}, "prompt", "at most 200 characters"),
    ({"response_format": "url"}, "response_format", "'b64_json'"),
    ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
    ({"deepcache": 0}, "deepcache", "greater than or equal to 1"),
    ({"size": "256x256"}, "size", "65536 pixels, more than serve.max_pixels=16384 allows"),  # 4x tiny's 64x64
    ({"size": "128x128", "steps": 41}, "steps", "671744 pixel-steps, more than serve.max_pixels_steps=655360"),
    ({"loras": {"a": "strong"}}, "loras.a", "valid number"),
])
def test_bad_requests_are_422_naming_the_field(server, body, param, allowed):
    response = server.client.request({"prompt": "x", "size": "64x64", "steps": 2, **body})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param}: ") and allowed in error["message"]


@pytest.mark.parametrize("launch", ["model=sdxl", "+launch=sdxl_prod"])
def test_the_default_cost_limits_accept_normal_sdxl_requests(compose_run, launch):
    """Derived from the model: SDXL's usual sizes, 50 steps, four images pass; the memory estimate the CLI
    uses (read once the server is warm) names n when one image would fit and four would not."""
    from dataclasses import replace

    import torch

    from onediffx.serve.cost import cost_limits

    limits = cost_limits(compose_run(launch, config_name="serve"))
    assert (limits.max_pixels, limits.max_pixels_steps) == (2048 * 2048, 2048 * 2048 * 30 * 4)
    for width, height in ((1024, 1024), (832, 1216), (1216, 832), (2048, 2048)):
        assert limits.problem(width, height, 30, 4) is None
        assert limits.problem(width, height, 50, 2) is None
    assert limits.problem(1024, 1024, 200, 4)[0] == "steps"
    assert limits.problem(4096, 2048, 1, 1)[0] == "size"
    fits_one = replace(limits, memory_bytes=2**30, dtype=torch.float16, device="cuda:0")
    field, message = fits_one.problem(1024, 1024, 30, 4)
    assert field == "n" and message == ("n: 1024x1024 x 4 image(s) needs at least 2.0 GiB for activations, and cuda:0 "
                                        "had 1.0 GiB free when the server turned ready; lower n")
    assert fits_one.problem(1024, 1024, 30, 1) is None


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_lone_surrogate_text_is_422_not_a_tokenizer_crash(server, field):
    raw = ('{"prompt": "x", "size": "64x64", "steps": 2, "%s": "a \\ud800 b"}' % field).encode()
    response = server.client.http.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field and "unicode" in error["message"].lower()


def test_limits_at_the_door(server):
    """A body over serve.max_body_bytes is 413 (declared, or chunked and counted as it arrives); a 422
    names the first few errors only; JSON that is not UTF-8 is a 400 and a head over serve.max_header_bytes
    a 400; every refusal of an image request in the API's error shape and counted."""
    url, json_type = "/v1/images/generations", {"content-type": "application/json"}
    before = server.metrics()
    declared = server.client.http.post(url, content=b'{"prompt": "' + b"x" * 300_000 + b'"}', headers=json_type)

    def chunks():  # 4 MiB, sent chunked: no Content-Length to refuse it by
        for _ in range(256):
            yield b" " * 16384

    chunked = httpx.post(server.url + url, content=chunks(), headers=json_type, timeout=60)
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["param"] == "body" and "serve.max_body_bytes=262144" in error["message"]
    assert "300014 bytes (Content-Length)" in declared.json()["error"]["message"]

    unknown = ("{" + ", ".join(f'"k{i}": 0' for i in range(20_000)) + ', "prompt": "x", "size": "64x64"}').encode()
    assert len(unknown) < 262144
    invalid = server.client.http.post(url, content=unknown, headers=json_type)
    assert invalid.status_code == 422 and len(invalid.content) < 4096, len(invalid.content)
    body = invalid.json()
    assert body["error_count"] == 20_000 and len(body["detail"]) == 5
    assert body["error"]["message"] == "k0: Extra inputs are not permitted (and 19999 more errors)"

    not_utf8 = server.client.http.post(url, content=b'{"prompt": "\xff"}', headers=json_type)
    assert not_utf8.status_code == 400 and not_utf8.json()["error"]["type"] == "invalid_request_error"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:  # a head that never ends
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)
        assert raw.recv(4096).startswith(b"HTTP/1.1 400 ")
    after = server.metrics()
    for status, more in (("413", 2), ("422", 1), ("400", 1)):
        key = f"onediffx_requests_total{{status={status}}}"
        assert after.get(key, 0) - before.get(key, 0) == more, key


def test_non_finite_numbers_unknown_loras_and_faults(server):
    raw = b'{"prompt": "x", "size": "64x64", "steps": 2, "guidance": NaN}'
    response = server.client.http.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "guidance"
    raw = b'{"prompt": "x", "size": "64x64", "steps": 2, "loras": {"a": Infinity}}'
    response = server.client.http.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422 and "finite" in response.json()["error"]["message"]

    response = server.client.request({"prompt": "x", "size": "64x64", "steps": 2, "loras": {"nope": 1.0}})
    assert response.status_code == 404
    assert response.json()["error"] == {"message": "loras: 'nope' is not preloaded; preloaded: a, b",
                                        "type": "not_found_error", "param": "loras"}

    # Guidance beyond the CLI's bound (it used to turn the latents to NaN, a 500) is refused at the door ...
    response = server.client.request({"prompt": "x", "size": "64x64", "steps": 2, "guidance": 1e300})
    assert response.status_code == 422 and response.json()["error"]["param"] == "guidance", response.text
    assert "less than or equal to 100" in response.json()["error"]["message"]
    # ... and the server keeps serving.
    assert len(server.client.generate("x", size="64x64", steps=2, seed=3)) == 1
    assert server.metrics().get("onediffx_requests_total{status=500}", 0) == 0


def test_models_health_openapi_and_streaming(server):
    models = server.client.models()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["loras"] == ["a", "b"]
    assert server.client.http.get("/healthz").json() == {"status": "ok"}
    ready = server.client.http.get("/readyz").json()
    assert ready["status"] == "ready" and ready["replicas"] == ["cpu", "cpu"]
    schema = server.client.http.get("/openapi.json").json()
    request = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    for field in ("prompt", "n", "size", "response_format", "negative_prompt", "seed", "steps", "guidance", "loras",
                  "deepcache", "stream"):
        assert request[field].get("description"), field
    assert request["steps"]["maximum"] == 200 and request["n"]["maximum"] == 4

    events = list(server.client.stream("a red fox", size="64x64", steps=3, seed=11))
    assert [e for e, _ in events] == ["progress"] * 3 + ["image"]
    assert [d["step"] for _, d in events[:3]] == [1, 2, 3]
    from onediffx.client import decode

    streamed = as_array(decode(events[-1][1])[0])
    plain = as_array(server.client.generate("a red fox", size="64x64", steps=3, seed=11)[0])
    assert np.abs(streamed - plain).max() <= 2


def test_deepcache_per_request(server, root, conf):
    """``deepcache: 2`` is the image ``run deepcache=i2`` gives; without it, the plain one."""
    cached = as_array(server.client.generate("a fox", size="64x64", steps=4, seed=5, deepcache=2)[0])
    plain = as_array(server.client.generate("a fox", size="64x64", steps=4, seed=5)[0])
    work = root / "deepcache"
    work.mkdir()
    proc = run_cli("run", "deepcache=i2", "prompt=a fox", "steps=4", "seed=5", f"hydra.searchpath=[file://{conf}]",
                   "lora=[a,b]", "cache.enabled=false", "hydra.run.dir=out", cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    oracle = as_array(Image.open(next((work / "out").glob("image_*.png"))))
    assert np.abs(cached - oracle).max() <= 2
    assert np.abs(plain - oracle).max() > 2  # DeepCache changed the image: the interval was applied


@pytest.fixture(scope="module")
def busy_server(root):
    """One replica, one image per call, two waiting requests at most, one second per request; started from
    a launch preset, as production would be."""
    srv = Server(root / "busy", "+launch=tiny_prod", "serve.max_batch=1", "serve.queue_limit=2", "serve.request_timeout_s=1",
                 "serve.max_steps=5000", "serve.batch_wait_ms=0")
    srv.wait_ready()
    log = srv.log.read_text()
    assert "start-up: model tiny on cpu" in log and "warmup" in log  # the launch's start-up table
    yield srv
    srv.stop()


LONG = {"prompt": "long", "size": "64x64", "steps": 24}  # seconds on this CPU: past the 1 s timeout


def test_full_queue_is_429_and_late_requests_504(busy_server):
    srv = busy_server
    before = srv.metrics().get("onediffx_batch_seconds_count{replica=replica0}", 0.0)

    async def scenario():
        async with AsyncClient(srv.url) as client:
            first = asyncio.ensure_future(client.request({**LONG, "seed": 1}))
            await asyncio.to_thread(srv.wait_metric, "onediffx_replicas_busy", lambda v: v == 1)
            queued = [asyncio.ensure_future(client.request({**LONG, "seed": s})) for s in (2, 3)]
            await asyncio.to_thread(srv.wait_metric, "onediffx_queue_depth", lambda v: v == 2)
            full = await client.request({**LONG, "seed": 4})
            return full, await first, await asyncio.gather(*queued)

    full, first, queued = asyncio.run(scenario())
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
    assert "queue is full" in full.json()["error"]["message"]
    assert first.status_code == 504 and "request_timeout_s=1" in first.json()["error"]["message"]
    assert [r.status_code for r in queued] == [504, 504]
    m = srv.metrics()
    assert m["onediffx_dropped_requests_total{reason=timeout}"] == 2  # left the queue: never generated
    assert m["onediffx_queue_depth"] == 0
    srv.wait_metric("onediffx_replicas_busy", lambda v: v == 0)
    assert srv.metrics()["onediffx_batch_seconds_count{replica=replica0}"] == before + 1  # only the first ran


def test_disconnected_client_leaves_the_queue(busy_server):
    srv = busy_server
    srv.wait_metric("onediffx_replicas_busy", lambda v: v == 0)
    before = srv.metrics()["onediffx_batch_seconds_count{replica=replica0}"]
    with httpx.Client(base_url=srv.url, timeout=30) as runner:
        import threading

        running = threading.Thread(target=runner.post, args=("/v1/images/generations",), kwargs={"json": {**LONG, "seed": 9}})
        running.start()
        srv.wait_metric("onediffx_replicas_busy", lambda v: v == 1)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(f"{srv.url}/v1/images/generations", json={**LONG, "seed": 10}, timeout=0.3)
        srv.wait_metric("onediffx_dropped_requests_total{reason=disconnect}", lambda v: v == 1, timeout=5)
        assert srv.metrics()["onediffx_queue_depth"] == 0
        running.join()
    srv.wait_metric("onediffx_replicas_busy", lambda v: v == 0)
    assert srv.metrics()["onediffx_batch_seconds_count{replica=replica0}"] == before + 1


def test_sigterm_answers_what_was_received_and_exits_0(server):
    """Last test of the main server: SIGTERM while requests run and wait; all answered, exit 0, no files."""
    async def scenario():
        async with AsyncClient(server.url) as client:
            pending = [asyncio.ensure_future(client.request({"prompt": f"p{i}", "size": "64x64", "steps": 8,
                                                             "seed": i, "guidance": 1.5 + i}))
                       for i in range(4)]
            await asyncio.to_thread(server.wait_metric, "onediffx_replicas_busy", lambda v: v >= 1)
            os.kill(server.proc.pid, signal.SIGTERM)
            return await asyncio.gather(*pending)

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 4, [r.text[:200] for r in responses]
    assert server.proc.wait(timeout=60) == 0, server.log.read_text()[-2000:]
    assert "every request received was answered" in server.log.read_text()
    assert list(server.cwd.iterdir()) == []  # no Hydra run folder, no log file
    with pytest.raises(httpx.TransportError):
        server.client.http.get("/healthz")


def test_ray_engine_serves_the_same_requests(root, conf):
    """``serve.engine=ray``: a local Ray instance, two CPU replicas, the first requests of the mix."""
    pytest.importorskip("ray.serve", reason="serve.engine=ray needs ray[serve] (pip install 'onediffx[ray]')")
    if not SERVED:
        pytest.skip("needs the images of test_batched_mixed_requests_match_the_batch_command")
    srv = Server(root / "ray", f"hydra.searchpath=[file://{conf}]", "lora=[a,b]", "serve.engine=ray",
                 "serve.replicas=2", "serve.ray_num_cpus=0.5", "serve.max_batch=4", "steps=2")
    try:
        srv.wait_ready()
        bodies = requests_mix()[:12]
        responses = asyncio.run(drive(srv.url, bodies, concurrency=4))
        assert [r.status_code for r in responses] == [200] * len(bodies), [r.text[:200] for r in responses]
        from onediffx.client import decode

        for body, response in zip(bodies, responses):
            for image, expected in zip(decode(response.json()), SERVED[json.dumps(body, sort_keys=True)]):
                assert np.abs(as_array(image) - expected).max() <= 2
        assert srv.client.models()["data"][0]["loras"] == ["a", "b"]
        os.kill(srv.proc.pid, signal.SIGTERM)  # the server's process only, as an orchestrator would
        assert srv.proc.wait(timeout=180) == 0, srv.log.read_text()[-2000:]
    finally:
        srv.stop()


def test_serve_bench_scenario_runs_both_servers(tmp_path):
    """``bench.scenarios=[serve]`` on the tiny model: the machinery (both servers, every load level), not speed.
    The peer starts beside onediffx (``serve_peer_early``) and is driven after onediffx's rows."""
    proc = run_cli("bench", "model=tiny", "model.synthetic=false", "compile=none", "bench.scenarios=[serve]",
                   "bench.serve_concurrency=[1,4]", "bench.serve_requests=8", "steps=2", "hydra.run.dir=out",
                   "bench.serve_peer_early=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert not [r for r in rows if "error" in r], rows
    loads = [(r["server"], r["load"]) for r in rows]
    peer = "diffusers eager (1 at a time)"
    assert loads == [("onediffx", "start → /readyz, first start"), ("onediffx", "start → /readyz, warm graph cache"),
                     ("onediffx", "closed, 1 clients"), ("onediffx", "closed, 4 clients"),
                     ("onediffx", "open (Poisson), 80% of best"), (peer, "start → /readyz, started beside onediffx's runs"),
                     (peer, "closed, 1 clients"), (peer, "closed, 4 clients"), (peer, "open (Poisson), 80% of best")]
    measured = [r for r in rows if "requests" in r]
    assert all(r["errors"] == 0 and r["images_per_s"] > 0 and r["p99_s"] >= r["p50_s"] > 0 for r in measured)
    assert all(r["exit_code"] == 0 and r["ready_s"] > 0 for r in rows if "ready_s" in r)
    # started early, the peer's start is timed from onediffx's first start: it spans both of onediffx's starts
    assert rows[5]["ready_s"] > rows[0]["ready_s"] + rows[1]["ready_s"]
    assert all(r["mean_batch"] >= 1 for r in measured if r["server"] == "onediffx")
    opened = {r["server"]: r for r in measured if r["load"].startswith("open")}
    assert opened["onediffx"]["max_queue_depth"] is not None and opened[peer]["max_queue_depth"] is None
    single = next(r["p50_s"] for r in measured if r["server"] == "onediffx" and r["load"] == "closed, 1 clients")
    assert opened["onediffx"]["p99_over_single"] == pytest.approx(opened["onediffx"]["p99_s"] / single, abs=0.01)


def test_the_peer_row_names_its_compile_mode():
    """A stronger peer (``reduce-overhead``: CUDA graphs) is a different row, never mixed with the default one."""
    from omegaconf import OmegaConf

    from onediffx.bench.serve import _peer_label

    def label(mode, backend="inductor"):
        return _peer_label(OmegaConf.create({"bench": {"peer_compile": True, "serve_peer_mode": mode},
                                             "compile": {"backend": backend}}))

    assert label(None) == "diffusers + torch.compile (1 at a time)"
    assert label("reduce-overhead") == "diffusers + torch.compile mode=reduce-overhead (1 at a time)"
    assert label("reduce-overhead", backend="none") == "diffusers eager (1 at a time)"


def test_the_peer_start_is_warm_only_from_a_filled_inductor_cache(tmp_path):
    from omegaconf import OmegaConf

    from onediffx.bench.serve import _peer_start

    def start(folder):
        return _peer_start(OmegaConf.create({"bench": {"serve_peer_cache": folder}}))

    assert start(None) == start(str(tmp_path / "missing")) == start(str(tmp_path)) == "cold"
    (tmp_path / "fxgraph").mkdir()
    assert start(str(tmp_path)) == "warm Inductor cache"


def test_serve_bench_can_drive_the_peer_alone(tmp_path):
    """``bench.serve_onediffx=false``: the peer's start and load levels in a GPU call of their own; with no
    server left to drive, the run stops in one line before anything starts."""
    common = ("bench", "model=tiny", "model.synthetic=false", "compile=none", "bench.scenarios=[serve]",
              "bench.serve_onediffx=false", "steps=2")
    proc = run_cli(*common, "bench.serve_concurrency=[2]", "bench.serve_requests=4", "bench.serve_open_fractions=[]",
                   "bench.serve_sizes=1", "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    peer = "diffusers eager (1 at a time)"
    assert [(r["server"], r["load"]) for r in rows] == [(peer, "start → /readyz, cold, alone"), (peer, "closed, 2 clients")]
    assert rows[0]["exit_code"] == 0 and rows[1]["errors"] == 0 and rows[1]["images_per_s"] > 0
    assert sorted(p.name for p in (tmp_path / "out" / "serve-logs").iterdir()) == ["peer.log"]
    # a call cut short still says how far the peer got: one line a call (2 warm-ups: one size × two LoRAs;
    # 4 requests, all of that size), and ready
    peer_log = (tmp_path / "out" / "serve-logs" / "peer.log").read_text()
    calls = [line for line in peer_log.splitlines() if ": switch " in line]
    assert "peer: ready" in peer_log and len(calls) == 6 and len({line.split(" x1")[0] for line in calls}) == 1
    assert f"{peer} ready in" in proc.stdout + proc.stderr
    refused = run_cli(*common, "bench.serve_peer=false", "hydra.run.dir=none", cwd=tmp_path)
    assert refused.returncode == 2 and "bench.serve_onediffx=false needs bench.serve_peer=true" in refused.stderr + refused.stdout
    assert not (tmp_path / "none" / "bench.json").exists()
    refused = run_cli(*common, "bench.serve_peer_mode=fastest", "hydra.run.dir=none", cwd=tmp_path)
    assert refused.returncode == 2 and "bench.serve_peer_mode: unknown torch.compile mode 'fastest'" in refused.stderr + refused.stdout
    refused = run_cli(*common, "bench.serve_sizes=3", "hydra.run.dir=none", cwd=tmp_path)
    assert refused.returncode == 2 and "bench.serve_sizes: 3 is not 1 or 2" in refused.stderr + refused.stdout


def test_serve_bench_without_peer_or_load_only_fills_the_named_cache_and_times_both_starts(tmp_path):
    """The first of two short GPU calls: the bench's own server arguments fill ``bench.serve_cache``."""
    proc = run_cli("bench", "model=tiny", "model.synthetic=false", "compile=none", "bench.scenarios=[serve]",
                   "bench.serve_peer=false", "bench.serve_concurrency=[]", f"bench.serve_cache={tmp_path / 'graphs'}",
                   "steps=2", "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert [r["load"] for r in rows] == ["start → /readyz, first start", "start → /readyz, warm graph cache"], rows
    assert all(r["exit_code"] == 0 and r["ready_s"] > 0 for r in rows)
    assert "serve row: " in proc.stdout + proc.stderr  # each row is logged as measured
    kept = tmp_path / "out" / "serve-logs"  # the servers' own logs outlive the bench's temporary folder
    assert sorted(p.name for p in kept.iterdir()) == ["onediffx-cold.log", "onediffx-warm.log"]
    warm = (kept / "onediffx-warm.log").read_text()
    assert "onediffx serve: ready in" in warm and "start-up: model tiny" in warm  # with the stage table


@pytest.mark.slow
def test_a_parallel_fill_leaves_every_shape_for_the_warm_start(tmp_path):
    """``bench.serve_fill_jobs=2``: two first starts at once, each compiling one size of the mix into the
    one cache (their saves merge), the peer starting beside them; the warm start compiles nothing."""
    proc = run_cli("bench", "model=tiny", "model.synthetic=false", "compile=inductor", "bench.scenarios=[serve]",
                   "bench.serve_concurrency=[]", "bench.serve_fill_jobs=2", "bench.serve_max_batch=1", "bench.peer_compile=false",
                   f"bench.serve_cache={tmp_path / 'graphs'}", "steps=2", "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert [(r["server"], r["load"]) for r in rows] == [
        ("onediffx", f"start → /readyz, first start on {tmp_path / 'graphs'}, 2 processes"),
        ("onediffx", "start → /readyz, warm graph cache"),
        ("diffusers eager (1 at a time)", "start → /readyz, beside onediffx's fill")], rows
    assert all(r["exit_code"] == 0 and r["ready_s"] > 0 for r in rows)
    assert 0 < rows[1]["ready_after_weights_s"] < rows[1]["ready_s"]
    manifests = [json.loads(m.read_text()) for m in (tmp_path / "graphs" / "unet").glob("*/manifest.json")]
    assert len(manifests) == 1
    heights = sorted({g["signature"][0][0][0][2] for g in manifests[0]["graphs"]})
    assert len(heights) == 2, heights  # each process's size is in the one entry


def test_a_serve_bench_ended_by_sigterm_leaves_no_server_behind(tmp_path):
    """``timeout`` ends a bench with SIGTERM; its servers run in sessions of their own and must be
    stopped by the bench, not left holding the device (as one was on the H200)."""
    import subprocess
    import sys
    import time

    from conftest import REPO

    def ours() -> list[str]:  # processes whose command line points into this test's folder
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(tmp_path) in text and "onediffx" in text:
                found.append(text)
        return found

    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    bench = subprocess.Popen([sys.executable, "-m", "onediffx", "bench", "model=tiny", "model.synthetic=false",
                              "compile=none", "bench.scenarios=[serve]", "steps=2", "hydra.run.dir=out"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("onediffx-serve-bench-*/onediffx-*.log")) and time.monotonic() < deadline:
            assert bench.poll() is None, "the bench ended before starting a server"
            time.sleep(0.2)
        time.sleep(2)
        assert ours(), "no server process found to stop"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=180) != 0
        deadline = time.monotonic() + 60
        while ours() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not ours(), ours()
    finally:
        if bench.poll() is None:
            bench.kill()


@pytest.mark.parametrize("override, message", [
    ("serve.batch_sizes=[1,2]", "serve.batch_sizes: [1, 2] is not allowed; expected sizes from 1 to serve.max_batch=4"),
    ("serve.replicas=two", "serve.replicas: 'two' is not allowed; expected a number >= 1 or 'all'"),
])
def test_bad_serve_config_is_one_line_before_listening(tmp_path, override, message):
    proc = run_cli("serve", override, f"serve.port={free_port()}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and f"onediffx: error: {message}" in proc.stderr, proc.stderr[-1000:]
    assert "listening" not in proc.stdout and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["port_in_use", "bad_host"])
def test_a_port_in_use_or_a_bad_host_is_one_line_before_the_model_loads(tmp_path, case):
    """The socket is bound before anything loads: one line and exit 2, not "listening", a whole load
    and warm-up (the launch warms a shape: its progress would be on stderr), then uvicorn's exit 3."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        where, message = {"port_in_use": ([f"serve.port={port}"], f"serve.port: {port} on 127.0.0.1 is in use"),
                          "bad_host": (["serve.host=999.1.1.1", f"serve.port={free_port()}"],
                                       "serve.host: '999.1.1.1' is not a valid IPv4 address")}[case]
        proc = run_cli("serve", "+launch=tiny_prod", "cache.enabled=false", *where, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(f"onediffx: error: {message}")
    assert "listening" not in proc.stdout and "ready" not in proc.stdout and list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_one_replica_per_gpu(root):
    """``serve.replicas=all``: one pipeline per visible GPU behind one endpoint, each one used, memory reported."""
    import torch

    gpus = torch.cuda.device_count()
    srv = Server(root / "gpus", "serve.replicas=all", "serve.max_batch=2", "serve.batch_wait_ms=50", "steps=4")
    try:
        srv.wait_ready()
        assert srv.client.http.get("/readyz").json()["replicas"] == [f"cuda:{i}" for i in range(gpus)]
        bodies = [{"prompt": f"p{i}", "size": "64x64", "steps": 4, "seed": i, "guidance": 1.0 + i % 3}
                  for i in range(8 * gpus)]
        responses = asyncio.run(drive(srv.url, bodies, concurrency=4 * gpus))
        assert [r.status_code for r in responses] == [200] * len(bodies)
        m = srv.metrics()
        for i in range(gpus):
            assert m[f"onediffx_batch_seconds_count{{replica=replica{i}}}"] > 0
            assert m[f"onediffx_gpu_memory_bytes{{device=cuda:{i},kind=allocated}}"] > 0
    finally:
        srv.stop()
