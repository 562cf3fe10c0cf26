"""Structured configs: the types and defaults of every key ``conf/`` may set.

Hydra merges ``conf/`` and the command line into these dataclasses, so a wrong type, an unknown
key or a value outside an Enum fails at composition with its key path. Each capability owns its
group's dataclass (``compile.config``, ``deep_cache.config``); this module composes them. Ranges that types cannot express (steps > 0, sizes
that are multiples of 8) are checked in ``onediffx.config.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ..compile.config import CompileConfig, OnMiss
from ..errors import ConfigError
from ..deep_cache.config import DeepCacheConfig
from ..quantize.config import QuantizeConfig
from ..parallel.config import ParallelConfig
from ..step_cache.config import StepCacheConfig
from ..instantid.config import FaceConfig


@dataclass
class ModelConfig:
    """Which diffusers pipeline, where its weights are, and its sensible defaults."""

    name: str = "tiny"
    pipeline: str = "StableDiffusionPipeline"
    """A name from the allow-list in ``onediffx.models.pipelines`` (never an import path)."""
    pretrained: Optional[str] = None
    """Hub id, looked up in the local Hugging Face cache only."""
    path: Optional[str] = None
    """Local folder (``save_pretrained`` layout) or single ``.safetensors`` file; wins over ``pretrained``."""
    builtin: Optional[str] = None
    """A built-in tiny model (``tiny``, ``tiny_xl``, ``tiny_svd``, ``tiny_flux``, ``tiny_sd3``, ...)."""
    synthetic: bool = False
    """Build the full architecture with seeded random weights (benchmarks without downloads)."""
    arch: Optional[str] = None
    """Embedded architecture used when ``synthetic`` is true (``sdxl``, ``flux_dev``, ``sd35_large``, ...: ``models/arch/``)."""
    unet: Optional[str] = None
    """Hub id or folder of a replacement UNet (LCM-SDXL)."""
    controlnet: Optional[str] = None
    """Hub id or folder of the ControlNet, for ControlNet pipelines."""
    instantid: Optional[str] = None
    """InstantID: Hub id (local cache) or folder with ``ControlNetModel/`` and ``ip-adapter.safetensors``/``.bin``;
    with ``synthetic`` its architecture is built with seeded weights instead."""
    scheduler: Optional[str] = None
    """A scheduler class name from the allow-list; ``None`` keeps the checkpoint's own."""
    dtype: str = "float16"
    """Weights dtype on an accelerator (the CPU always runs float32 unless ``dtype`` is set)."""
    variant: Optional[str] = None
    height: int = 512
    width: int = 512
    steps: int = 30
    guidance: float = 7.5
    num_frames: Optional[int] = None
    """Video models: frames per clip."""


@dataclass
class LoraEntry:
    """One LoRA in the stack; ``lora=[a,b]`` fuses entries in list order."""

    source: str = MISSING
    """Hub id (local cache only), local file, or local folder."""
    weight_name: Optional[str] = None
    scale: float = 1.0
    adapter_name: Optional[str] = None
    """Defaults to the entry's key in ``lora``."""
    base: Optional[str] = None
    """Base family it was trained for (``sd15``, ``sdxl``, ``flux_dev``, ``sd35_large``), shown by ``onediffx list``."""


@dataclass
class LoraStack:
    """The ``lora`` group typed: its entries in fuse order, each ``adapter_name`` resolved once.

    The schema keeps ``lora`` an untyped mapping (see ``RunConfig.lora``), and an entry's default
    adapter name is its key, which the entry alone does not know: the stack fills it in
    ``__post_init__``, so the stage, the server and batch runs read ``entry.adapter_name`` only.
    """

    entries: Dict[str, LoraEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, entry in self.entries.items():
            if entry.adapter_name is None:
                entry.adapter_name = key

    @classmethod
    def from_config(cls, node: Optional[DictConfig]) -> "LoraStack":
        """The stack of a composed ``lora`` node (entries typed by ``validate`` or still plain mappings)."""
        entries = {}
        for key in (node or {}).keys():
            entry = node._get_node(key)
            if OmegaConf.get_type(entry) is not LoraEntry:
                entry = OmegaConf.merge(OmegaConf.structured(LoraEntry), entry)
            entries[str(key)] = OmegaConf.to_object(entry)
        return cls(entries=entries)

    def validate(self, prefix: str = "lora.") -> None:
        """Two entries may not load under one adapter name (the second would replace the first)."""
        seen: dict[str, str] = {}
        for key, entry in self.entries.items():
            name = entry.adapter_name
            if name in seen:
                raise ConfigError(f"{prefix}{key}: adapter name {name!r} is also used by {prefix}{seen[name]}")
            seen[name] = key


@dataclass
class CacheConfig:
    """Where compiled graphs are saved and loaded from."""

    enabled: bool = True
    dir: str = "${oc.env:ONEDIFFX_CACHE_DIR,${oc.env:HOME,.}/.cache/onediffx/graphs}"
    trusted: bool = False
    """Load from a folder others can write (group/other write bit, another owner); off: refused."""
    key_file: str = "${oc.env:ONEDIFFX_CACHE_KEY,${oc.env:HOME,.}/.config/onediffx/graph-cache.key}"
    """The secret that signs entries (created 0600 on first use); machines sharing a cache share it."""


@dataclass
class ShapeConfig:
    height: int = MISSING
    width: int = MISSING
    batch: int = 1


class OnCacheHit(str, Enum):
    """What warm-up does when every graph came from the cache (``warmup.on_cache_hit``)."""

    skip = "skip"
    run = "run"


class LoraOriginals(str, Enum):
    """Where the original weights of LoRA-touched layers are kept for exact re-fusing (``lora_originals``)."""

    cpu = "cpu"
    """A run fuses once: GPU memory matters more than switch speed."""
    device = "device"
    """A server switches LoRAs between batches: about twice as fast (0.085 against 0.19 s for an SDXL
    stack on an H200), at the touched layers' size in GPU memory."""


class OnBadLine(str, Enum):
    """What a malformed line of a prompts file does (``on_bad_line``)."""

    fail = "fail"
    skip = "skip"


@dataclass
class WarmupConfig:
    """Calls made before timing, so compilation happens before the first measured image."""

    runs: int = 1
    steps: int = 2
    shapes: List[ShapeConfig] = field(default_factory=list)
    """Resolutions to prepare; empty means the run's own resolution."""
    unprepared: OnMiss = OnMiss.compile
    """What a shape outside ``shapes`` does: ``compile`` once, or run ``eager``."""
    on_cache_hit: OnCacheHit = OnCacheHit.skip
    """When every graph came from the cache: ``skip`` the warm-up (the first image pays library
    start-up and CUDA-graph capture, about 1.5 s for SDXL, instead of a whole extra call first), or
    ``run`` it (each prepared shape's first request is as fast as the next; launches use this)."""


@dataclass
class SweepConfig:
    """How a multirun is summarised and spread over GPUs (``onediffx.sweep``)."""

    baseline: Optional[str] = None
    """Job the others are compared with: its number (``2``) or overrides (``"deepcache=off compile=none"``);
    ``None`` is the first job that succeeded."""
    gpus: Optional[int] = None
    """GPUs to spread ``device=auto`` jobs over: job ``n`` runs on ``cuda:(n % gpus)``. ``None``: as many as
    the launcher runs at once (``hydra.launcher.n_jobs``) and are visible; ``0``: never pin."""
    summary: bool = True
    """Write ``summary.csv``, ``summary.md`` and ``summary.png`` in the sweep folder at the end."""


DEFAULT_STAGES = ["quantize", "lora-fuse", "deepcache", "compile", "load-graph", "stepcache", "parallel", "warmup",
                  "save-graph"]


@dataclass
class RunConfig:
    """The top config of ``python -m onediffx run``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    deepcache: DeepCacheConfig = field(default_factory=DeepCacheConfig)
    stepcache: StepCacheConfig = field(default_factory=StepCacheConfig)
    """diffusers' step caches on a transformer (``onediffx.step_cache``); ``stepcache=off`` by default."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """A request over two processes (``onediffx.parallel``); ``parallel=off`` by default."""
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    """fp8/int8 quantization of the UNet's linear layers (``onediffx.quantize``); ``quantize=off`` by default."""
    face: FaceConfig = field(default_factory=FaceConfig)
    """InstantID's face input and scales (``onediffx.instantid``); unused by other models."""
    lora: Dict[str, Any] = field(default_factory=dict)
    """Entries are ``LoraEntry``s, typed by ``validate``: OmegaConf cannot create a dataclass entry
    from a command-line override (``+lora.mine.source=x.safetensors``), so the schema takes any
    mapping and validation merges each into ``LoraEntry`` (unknown keys and wrong types fail there)."""
    lora_originals: LoraOriginals = LoraOriginals.cpu
    """Where LoRA-touched layers' original weights are kept: ``cpu`` (``run``) or ``device`` (``serve``)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    stages: List[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    plugins: List[str] = field(default_factory=list)
    """Plugins to load by name: a module of ``onediffx.plugins`` (the repository's ``plugins/``) or an installed entry point."""
    plugin_options: Dict[str, Any] = field(default_factory=dict)
    """Options of plugin stages, one mapping per stage group (``plugin_options.vae_tiling.tile=512``)."""

    prompt: str = "a photo of an astronaut riding a horse on the moon"
    negative_prompt: Optional[str] = None
    seed: int = 0
    num_images: int = 1
    """Images per prompt; image ``i`` uses seed ``seed + i``."""
    height: Optional[int] = None
    """``None`` takes the model's default."""
    width: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    image: Optional[str] = None
    """Conditioning image for ControlNet and video models; ``None`` uses a built-in test pattern."""
    repeat: int = 1
    """Generate this many times and report the median latency."""
    device: str = "auto"
    dtype: str = "auto"
    """``auto``: the model's dtype on an accelerator, float32 on the CPU."""

    # --- sweeps, batch prompts and launches (onediffx.sweep, onediffx.commands.batch, onediffx.startup) ---
    prompts: Optional[str] = None
    """A JSON-lines file, one prompt object a line; generates them all instead of ``prompt``."""
    resume: bool = False
    """Batch runs: continue the ``manifest.jsonl`` in the output folder, skipping prompts already done."""
    on_bad_line: OnBadLine = OnBadLine.fail
    """Batch runs: a malformed line ``fail``s the run before anything loads, or is ``skip``ped with a warning."""
    startup_report: bool = False
    """Print the start-up time by stage, with compile and graph-cache status (launch presets set it)."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # --- end of sweeps, batch prompts and launches ---


@dataclass
class BenchOptions:
    """What ``python -m onediffx bench`` measures (``conf/bench.yaml``)."""

    scenarios: List[str] = field(default_factory=lambda: ["steady", "cold_start", "lora", "deepcache"])
    repeat: int = 3
    unet_iters: int = 10
    peer_compile: bool = True
    """Include plain ``torch.compile`` of the UNet as a peer."""
    compile_preset: str = "inductor"
    """The ``conf/compile/`` preset onediffx runs with (the cold-start processes select it by name)."""
    also_presets: List[str] = field(default_factory=list)
    """More ``conf/compile/`` presets for the steady scenario, each on a freshly loaded pipeline in the
    same process, e.g. ``[regional]``: presets compared against the same eager measurements."""
    cold_start_timeout: int = 900
    cold_start_peers: bool = True
    """Also restart plain torch.compile cold and with warm Inductor caches (about 3 minutes for SDXL)."""
    lora_sizes_mb: List[float] = field(default_factory=lambda: [12.0, 23.0, 28.0, 55.0, 270.0])
    deepcache_intervals: List[int] = field(default_factory=lambda: [2, 3, 5])
    deepcache_compile: bool = True
    quantize_modes: List[str] = field(default_factory=lambda: ["fp8", "int8"])
    """``quantize`` scenario: the modes measured beside unquantized onediffx (``onediffx.bench.quantize``)."""
    throughput_steps: int = 20
    """``throughput`` scenario: denoising steps per image (MLPerf's SDXL benchmark runs 20)."""
    throughput_batches: List[int] = field(default_factory=lambda: [1, 4, 8])
    """``throughput`` scenario: images per pipeline call, each measured for images/s."""
    throughput_modes: List[str] = field(default_factory=list)
    """``throughput`` scenario: quantize modes measured beside the recipe and unquantized onediffx
    (``fp8``, ``fp8_static``, ``int8_static``, ...: as ``quantize_modes``)."""
    recipe_peer: bool = True
    """Steady and quantize scenarios: diffusers' documented torch.compile recipe (channels-last, fused
    q/k/v, compiled UNet and VAE decode) as a peer row; every row's ``speedup_vs_recipe`` is against it."""
    recipe_mode: str = "reduce-overhead"
    """``torch.compile`` mode of that recipe (``reduce-overhead`` or ``max-autotune-no-cudagraphs``)."""
    serve_concurrency: List[int] = field(default_factory=lambda: [1, 4, 16])
    """``serve`` scenario: closed-loop client counts."""
    serve_open_fractions: List[float] = field(default_factory=lambda: [0.8])
    """``serve`` scenario: open-loop (Poisson) arrival rates, as fractions of the best closed-loop throughput."""
    serve_requests: int = 32
    """``serve`` scenario: requests per load level (at least twice the concurrency)."""
    serve_max_batch: int = 4
    serve_ready_timeout: int = 900
    serve_cache: Optional[str] = None
    """``serve`` scenario: the graph cache folder the servers use; unset, a fresh folder (the first
    start compiles). Point it at ``cache.dir`` of an earlier bench to start from graphs it saved."""
    serve_peer: bool = True
    """``serve`` scenario: also drive the plain diffusers server. ``false`` with ``serve_concurrency=[]``
    and ``serve_cache`` set only fills that cache with the exact server arguments of a later run and
    times the warm start: a first short call on a machine that cannot hold one long run. With
    ``serve_concurrency=[]`` and the peer on, the peer starts beside that fill, to fill its own
    Inductor cache (``serve_peer_cache``)."""
    serve_onediffx: bool = True
    """``serve`` scenario: ``false`` drives only the peer (cold, or from ``serve_peer_cache``). On the
    H200 a cold SDXL peer needs about 6 minutes to compile its four graphs (two sizes × two fused LoRAs:
    Dynamo guards on which adapter is merged), too long to share a ten-minute GPU call with onediffx's
    runs; its rows then come from a call of its own on the same card kind."""
    serve_sizes: int = 2
    """``serve`` scenario: sizes in the request mix, 1 or 2 (the run's size, then a landscape one). One
    size halves the peer's cold compile (one graph per LoRA), so both servers fit one GPU call."""
    serve_peer_mode: Optional[str] = None
    """``serve`` scenario: the peer's ``torch.compile`` mode (``reduce-overhead``, ``max-autotune``,
    ``max-autotune-no-cudagraphs``); unset, torch.compile's default (no CUDA graphs)."""
    serve_peer_early: bool = False
    """``serve`` scenario: start the peer with onediffx's first start instead of after onediffx's rows,
    so its compile (minutes for SDXL from a cold Inductor cache) overlaps onediffx's starts and load
    levels and both fit one ten-minute GPU call. onediffx is then measured beside a compiling process:
    a conservative figure for onediffx. The peer's load levels still run alone, after onediffx's."""
    serve_peer_cache: Optional[str] = None
    """``serve`` scenario: the peer's ``TORCHINDUCTOR_CACHE_DIR``, kept between runs; unset, a fresh
    folder (the peer's start compiles everything)."""
    serve_fill_jobs: int = 1
    """``serve`` scenario: onediffx's first start as this many processes at once, each warming its share
    of the sizes into the one graph cache (saves merge); the warm start then loads every shape."""
    record_dir: Optional[str] = None
    """Also file the record as ``<record_dir>/<date>-<card>/<record_name>.json`` (and ``.md``), the
    layout of ``benchmarks/results/``; unset, the record stays in the run's output folder only."""
    record_name: Optional[str] = None
    """The scenario name of that record (lower-case, dashes); unset: the model and the scenarios."""
    headline: bool = False
    """The record is meant for a headline table: it is marked as one only if no other process used the
    GPU during the run; otherwise it is written unmarked and the bench exits with an error."""


@dataclass
class BenchConfig(RunConfig):
    """The top config of ``python -m onediffx bench``: a run config plus what to measure."""

    bench: BenchOptions = field(default_factory=BenchOptions)


class ServeEngine(str, Enum):
    """Where ``onediffx serve`` runs its replicas (``serve.engine``)."""

    local = "local"
    """One process: uvicorn in front, one worker thread per replica (GPU)."""
    ray = "ray"
    """Ray Serve: the same app as a deployment, one replica per GPU, Ray's routing and autoscaling."""


@dataclass
class ServeConfig:
    """What ``python -m onediffx serve`` listens on and how it batches (``conf/serve.yaml``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    """``0``: a free port, printed when the server listens."""
    max_batch: int = 4
    """Images per pipeline call; compatible requests are batched up to this many."""
    batch_wait_ms: float = 20.0
    """How long the first request of a batch waits for compatible ones."""
    lora_affinity_ms: float = 1000.0
    """A free replica takes waiting requests with the LoRA weights it has fused before older ones that
    would make it switch, unless the oldest has waited this long (then FIFO); ``0``: always FIFO."""
    batch_sizes: List[int] = field(default_factory=list)
    """Pad each call to the smallest of these sizes (compiled pipelines: one graph per size, all warmed
    before ready); empty: calls run at the size they have (eager)."""
    queue_limit: int = 64
    """Requests waiting at most; more are answered 429 with Retry-After."""
    request_timeout_s: float = 300.0
    """A request not answered by then gets 504 (and leaves the queue)."""
    deepcache: Optional[int] = None
    """DeepCache interval of requests that do not give one; ``None``: the ``deepcache`` group's (off: 1)."""
    max_steps: int = 200
    max_size: int = 2048
    """Largest height or width a request may ask for."""
    max_prompt_chars: int = 4000
    max_pixels: Optional[int] = None
    """Largest width x height of a requested image; ``null``: four times the model's image (the largest of
    its default size and the warm-up shapes), 128x128 for ``tiny``, 2048x2048 for ``sdxl``. Attention's
    cost grows faster than the pixels: one tiny-model step takes 0.1 s at 64x64 and 22 s at 256x256 on a CPU."""
    max_pixels_steps: Optional[int] = None
    """Largest width x height x steps x n of one request, the work it holds a worker for; ``null``:
    ``max_pixels`` x the model's steps x ``max_batch`` (SDXL: four 2048x2048 images of 30 steps)."""
    max_body_bytes: int = 256 * 1024
    """Largest request body; a larger one is answered 413 as soon as its ``Content-Length`` says so, or,
    sent chunked, as soon as that many bytes have arrived. The default holds a prompt and a negative
    prompt of 10,000 characters (the most any prompt may have) in their longest JSON spelling, each
    character a ``\\uXXXX\\uXXXX`` pair."""
    max_header_bytes: int = 16 * 1024
    """A request head (request line and headers) still incomplete past this many bytes is answered 400
    and its connection closed (uvicorn's ``h11_max_incomplete_event_size``): no client makes the
    server buffer an endless head."""
    keep_alive_s: float = 5.0
    """An idle kept-alive connection is closed after this long (uvicorn's ``timeout_keep_alive``)."""
    max_connections: Optional[int] = 256
    """Open connections and requests in progress at most (uvicorn's ``limit_concurrency``); past it new
    requests get 503 at once. Bounds what slow or idle clients can hold; ``null``: no bound."""
    replicas: str = "1"
    """Pipelines behind the endpoint, one per GPU (``cuda:0``...): a number, or ``all`` visible GPUs.
    On the CPU, ``N`` pipelines share it (for tests)."""
    engine: ServeEngine = ServeEngine.local
    ray_num_cpus: Optional[float] = None
    """Ray engine: CPUs per replica (GPU replicas ask for one GPU each)."""
    model_id: Optional[str] = None
    """The name ``/v1/models`` lists; ``None``: ``model.name``."""

    @property
    def replica_count(self) -> Optional[int]:
        """``replicas`` parsed: the number asked for, ``None`` for ``all``; ``ConfigError`` otherwise.

        The one reading of the string, for the local engine and Ray alike (each counts ``all`` its own way).
        """
        wanted = str(self.replicas).strip().lower()
        if wanted == "all":
            return None
        if wanted.isdigit() and int(wanted) >= 1:
            return int(wanted)
        raise ConfigError(f"serve.replicas: {self.replicas!r} is not allowed; expected a number >= 1 or 'all'")

    def validate(self, prefix: str = "serve.") -> None:
        """Ranges types cannot express, each failure naming its key and what is allowed; before anything listens."""
        checks = [
            ("port", self.port, 0 <= self.port <= 65535, "a port from 0 to 65535"),
            ("max_batch", self.max_batch, 1 <= self.max_batch <= 256, "an integer from 1 to 256"),
            ("batch_wait_ms", self.batch_wait_ms, 0 <= self.batch_wait_ms <= 60_000, "0 to 60000 ms"),
            ("lora_affinity_ms", self.lora_affinity_ms, 0 <= self.lora_affinity_ms <= 600_000, "0 to 600000 ms"),
            ("queue_limit", self.queue_limit, self.queue_limit >= 1, "an integer >= 1"),
            ("request_timeout_s", self.request_timeout_s, self.request_timeout_s > 0, "a number of seconds > 0"),
            ("max_steps", self.max_steps, self.max_steps >= 1, "an integer >= 1"),
            ("max_size", self.max_size, self.max_size >= 8 and self.max_size % 8 == 0, "a multiple of 8, at least 8"),
            ("max_prompt_chars", self.max_prompt_chars, self.max_prompt_chars >= 1, "an integer >= 1"),
            ("max_pixels", self.max_pixels, self.max_pixels is None or self.max_pixels >= 64,
             "null (derived from the model) or a number of pixels >= 64"),
            ("max_pixels_steps", self.max_pixels_steps, self.max_pixels_steps is None or self.max_pixels_steps >= 64,
             "null (derived from the model) or a number >= 64"),
            ("max_body_bytes", self.max_body_bytes, self.max_body_bytes >= 1024, "a number of bytes >= 1024"),
            ("max_header_bytes", self.max_header_bytes, self.max_header_bytes >= 1024, "a number of bytes >= 1024"),
            ("keep_alive_s", self.keep_alive_s, self.keep_alive_s > 0, "a number of seconds > 0"),
            ("max_connections", self.max_connections, self.max_connections is None or self.max_connections >= 1,
             "null or an integer >= 1"),
            ("deepcache", self.deepcache, self.deepcache is None or self.deepcache >= 1, "null or an interval >= 1"),
            ("batch_sizes", list(self.batch_sizes), all(1 <= b <= self.max_batch for b in self.batch_sizes)
             and (not self.batch_sizes or max(self.batch_sizes) == self.max_batch),
             f"sizes from 1 to {prefix}max_batch={self.max_batch}, the largest equal to it (every call must fit one)"),
        ]
        for key, value, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{prefix}{key}: {value!r} is not allowed; expected {allowed}")
        self.replica_count  # noqa: B018  (raises on a value that is neither a number nor "all")


def serve_options(cfg: DictConfig) -> ServeConfig:
    """The composed ``serve`` group as a ``ServeConfig`` (its ``validate`` has run in ``check_serve``)."""
    return OmegaConf.to_object(cfg.serve)


@dataclass
class ServeRunConfig(RunConfig):
    """The top config of ``python -m onediffx serve``: a run config (the pipeline) plus the server."""

    serve: ServeConfig = field(default_factory=ServeConfig)


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore, where ``conf/*.yaml`` defaults lists refer to them."""
    from .dirname import register_resolver

    register_resolver()  # conf/*.yaml name run folders with ${onediffx.dirname:...}
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(name="bench_schema", node=BenchConfig)
    cs.store(name="serve_schema", node=ServeRunConfig)
