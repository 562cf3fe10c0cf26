#!/usr/bin/env bash
# The eighth session's H200 calls, one per argument; each fits one 10-minute call on a fresh machine
# (nothing stays warm between calls, so the graph cache travels through $OUT and `carry`).
#   fill:     the serve bench's own onediffx server fills the cache (two sizes, batch 1 and 2) and is
#             restarted on it; the fp8 oracle and attention GPU tests run beside it; the cache is packed.
#             Each compiled shape is saved as it finishes: run it again (carrying the parts in
#             outputs/carry) to go on from what an earlier call saved.
#   serve:    the serve bench (onediffx and the diffusers peer) on the carried cache.
#   quantize: quantize=off with compile.attention=flash against auto, and fp8, beside the recipe.
set -u
cd "$(dirname "$0")/.."
export ONEDIFFX_CACHE_KEY=$PWD/outputs/graphs.key PYTHONUNBUFFERED=1
G=$PWD/outputs/graphs
SERVE=(model=sdxl model.synthetic=true compile=inductor 'bench.scenarios=[serve]' bench.serve_max_batch=2
       bench.serve_requests=16 "bench.serve_cache=$G" "cache.dir=$G")
case "${1:-}" in
  fill)
    if ls outputs/carry/graphs.tgz.* >/dev/null 2>&1; then cat outputs/carry/graphs.tgz.* | tar xzf - -C outputs; fi
    python3 -m pytest -q -p no:cacheprovider -m gpu tests -k "fp8_compiled or attention" > "$OUT/gpu-tests.log" 2>&1 &
    tests=$!
    timeout 520 python3 -m onediffx bench "${SERVE[@]}" bench.serve_peer=false 'bench.serve_concurrency=[]' \
      hydra.run.dir="$OUT/fill" > "$OUT/fill.log" 2>&1
    echo "fill rc=$?"
    wait $tests; echo "gpu tests rc=$?"; tail -3 "$OUT/gpu-tests.log"
    du -sh "$G"; tar czf - -C outputs graphs graphs.key | split -b 15m - "$OUT/graphs.tgz."
    ls -la "$OUT"; grep "serve row" "$OUT/fill.log" ;;
  serve)
    mkdir -p outputs && cat outputs/carry/graphs.tgz.* | tar xzf - -C outputs && du -sh "$G" || exit 1
    timeout 585 python3 -m onediffx bench "${SERVE[@]}" hydra.run.dir="$OUT/serve" > "$OUT/serve.log" 2>&1
    echo "serve rc=$?"; grep "serve row" "$OUT/serve.log" | cut -c1-400 ;;
  *) echo "usage: $0 fill|serve|quantize" >&2; exit 2 ;;
esac
