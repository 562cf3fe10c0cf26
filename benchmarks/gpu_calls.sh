#!/usr/bin/env bash
# The H200 calls of the ninth to fifteenth sessions (gpu_session9.sh and gpu_session10.sh before), one per
# argument, each inside one 10-minute call.
# `serve` after `fill` finds outputs/ (both caches) only if the machine was still warm (30 s idle);
# otherwise it unpacks the onediffx graphs carried in outputs/carry and the peer starts cold. In the
# tenth session the machine went cold in between and the cold peer did not fit after onediffx's rows, so
# `serve` now starts the peer beside onediffx (bench.serve_peer_early=true: its compile overlaps
# onediffx's runs, which makes onediffx's figures conservative) and every server log comes back as one
# tar (the call returns at most 8 files).
#   fill:     onediffx's first start as two processes (one size each, saves merge into one cache entry)
#             and the diffusers peer's warm-up beside them (it fills its own Inductor cache); packs the
#             onediffx graphs into $OUT as the fallback.
#   serve:    the serve bench: onediffx warm start (ready time after the weights), closed loop 1/4/16,
#             open loop at 80% of the best throughput; then the peer (started at the beginning).
# The ninth session ran fill with `timeout 545` (too close to the call's 600 s: the bench had no time
# to stop its servers and pack), 16 requests a level and open loop at 80% and 50% as well.
# The twelfth session: the bench logs each server's ready time as soon as it is ready and the peer logs one
# line a call, so a call cut short still says how far the peer got; serve packs the peer's Inductor cache.
# SERVE_TIMEOUT (default 560 s) shortens serve for a call with less device time left: the twelfth session's
# last call, `SERVE_TIMEOUT=400 ... serve bench.serve_sizes=1 bench.serve_peer_mode=reduce-overhead ...`.
# Arguments after the first are extra overrides for `serve` (the eleventh session: 'bench.serve_concurrency=[1,16]').
#   quantize: quantize=off and fp8 beside the diffusers-docs recipe, in one call (fifteenth session: 297 s).
#             `onediffx run quantize=fp8` compiles and saves the fp8 graphs in a second process while the
#             bench runs eager, the recipe and quantize=off; the bench's fp8 row then loads them
#             (cache_hit true, first call 1.76 s). Compiled in the bench's own process, the fp8 row did
#             not fit a 10-minute call (fourteenth session). The fill is niced and its GPU work is one
#             image at the end of its compile; the bench's rows were timed beside it.
#   profile:  benchmarks/step_profile.py, unquantized then fp8, compiled side by side, profiled in turn.
#   e2e:      benchmarks/e2e_profile.py: one compiled SDXL call phase by phase (seventeenth session), as
#             compiled now, with cuDNN's conv benchmarking, and with Inductor's programmatic dependent launch.
#   switch:   benchmarks/lora_switch_profile.py: one LoRA switch on fp8 SDXL (originals on the host, then on
#             the GPU) and unquantized, timed and profiled (sixteenth session: ~100 s).
set -u
cd "$(dirname "$0")/.."
export ONEDIFFX_CACHE_KEY=$PWD/outputs/graphs.key PYTHONUNBUFFERED=1
G=$PWD/outputs/graphs P=$PWD/outputs/peer-inductor
SERVE=(model=sdxl model.synthetic=true compile=inductor 'bench.scenarios=[serve]' bench.serve_max_batch=2
       bench.serve_peer_early=true "bench.serve_cache=$G" "cache.dir=$G" "bench.serve_peer_cache=$P")
mkdir -p outputs
[[ " $* " == *" bench.serve_requests="* ]] || SERVE+=(bench.serve_requests=24)
case "${1:-}" in
  fill)
    timeout 480 python3 -m onediffx bench "${SERVE[@]}" 'bench.serve_concurrency=[]' bench.serve_fill_jobs=2 \
      hydra.run.dir="$OUT/fill" > "$OUT/fill.log" 2>&1
    echo "fill rc=$?"; du -sh "$G" "$P"
    tar czf - -C outputs graphs graphs.key | split -b 15m - "$OUT/graphs.tgz."
    tar czf "$OUT/fill-serve-logs.tgz" -C "$OUT/fill" serve-logs && rm -rf "$OUT/fill/serve-logs"
    ls -la "$OUT"; grep "serve row\|Error\|error" "$OUT/fill.log" | cut -c1-300 ;;
  serve)
    if [ ! -d "$G" ]; then cat outputs/carry/graphs.tgz.* | tar xzf - -C outputs || exit 1; echo "unpacked the carried graphs"; fi
    du -sh "$G" "$P"
    timeout "${SERVE_TIMEOUT:-560}" python3 -m onediffx bench "${SERVE[@]}" "${@:2}" \
      hydra.run.dir="$OUT/serve" > "$OUT/serve.log" 2>&1
    echo "serve rc=$?"; tar czf "$OUT/serve-logs.tgz" -C "$OUT/serve" serve-logs && rm -rf "$OUT/serve/serve-logs"
    tar czf - -C outputs peer-inductor | split -b 15m - "$OUT/peer-inductor.tgz."  # the peer's warm cache, to carry
    grep "serve row\|ready in" "$OUT/serve.log" | cut -c1-420 ;;
  quantize)
    Q=$PWD/outputs/qgraphs
    (timeout 400 nice python3 -m onediffx run model=sdxl model.synthetic=true quantize=fp8 compile=inductor \
      "cache.dir=$Q" hydra.run.dir="$OUT/fill" > "$OUT/fill.log" 2>&1; echo "fill rc=$? at $SECONDS s" >> "$OUT/fill.log") &
    sleep 5
    timeout "${QUANTIZE_TIMEOUT:-545}" python3 -m onediffx bench model=sdxl model.synthetic=true 'bench.scenarios=[quantize]' \
      'bench.quantize_modes=[fp8]' "cache.dir=$Q" hydra.run.dir="$OUT/bench" "${@:2}" > "$OUT/quantize.log" 2>&1
    echo "bench rc=$? at $SECONDS s"; wait; tail -1 "$OUT/fill.log"
    grep "bench quantize row" "$OUT/quantize.log" | python3 -c 'import sys, json
for line in sys.stdin:
    r = json.loads(line.split("row: ", 1)[1])
    print(r.get("method"), {k: r.get(k) for k in ("e2e_s", "unet_step_ms", "first_call_s", "peak_gib", "own_peak_gib",
          "left_by_earlier_rows_gib", "cache_hit", "compile_s", "weight_mib", "lora_switch_ms", "lora_unfuse_exact", "error")})'
    grep "still allocated" "$OUT/quantize.log" | cut -c1-200 ;;
  profile)
    P="timeout 520 python3 benchmarks/step_profile.py"
    ($P off "$OUT/off.json" > "$OUT/off.log" 2>&1; touch "$OUT/off.ended") &
    $P fp8 "$OUT/fp8.json" --after "$OUT/off.ended" > "$OUT/fp8.log" 2>&1; wait
    grep -h "step profile" "$OUT"/*.log; rm -f "$OUT"/*.done "$OUT"/*.ended ;;
  switch)
    for v in "fp8 --keep cpu" "fp8 --keep device" "off"; do
      set -- $v; timeout 120 python3 benchmarks/lora_switch_profile.py $v "$OUT/switch-$1-${3:-host}.json" 2>&1 | grep "switch profile"
    done ;;
  e2e)
    E="timeout 200 python3 benchmarks/e2e_profile.py"
    $E "$OUT/e2e-base.json" "${@:2}" 2>&1 | grep "e2e profile\|Error"
    $E "$OUT/e2e-cudnn-benchmark.json" --cudnn-benchmark "${@:2}" 2>&1 | grep "e2e profile\|Error"
    TORCHINDUCTOR_ENABLE_PDL=1 $E "$OUT/e2e-pdl.json" "${@:2}" 2>&1 | grep "e2e profile\|Error" ;;
  *) echo "usage: $0 fill|serve|quantize|profile|switch|e2e" >&2; exit 2 ;;
esac
