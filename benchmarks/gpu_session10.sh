#!/usr/bin/env bash
# The H200 calls of the ninth and tenth sessions, one per argument, each inside one 10-minute call.
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
#   quantize: quantize=off and fp8 beside the diffusers-docs recipe (the same-dtype fp8 quality figure).
set -u
cd "$(dirname "$0")/.."
export ONEDIFFX_CACHE_KEY=$PWD/outputs/graphs.key PYTHONUNBUFFERED=1
G=$PWD/outputs/graphs P=$PWD/outputs/peer-inductor
SERVE=(model=sdxl model.synthetic=true compile=inductor 'bench.scenarios=[serve]' bench.serve_max_batch=2
       bench.serve_requests=24 bench.serve_peer_early=true "bench.serve_cache=$G" "cache.dir=$G" "bench.serve_peer_cache=$P")
mkdir -p outputs
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
    timeout 560 python3 -m onediffx bench "${SERVE[@]}" \
      hydra.run.dir="$OUT/serve" > "$OUT/serve.log" 2>&1
    echo "serve rc=$?"; tar czf "$OUT/serve-logs.tgz" -C "$OUT/serve" serve-logs && rm -rf "$OUT/serve/serve-logs"
    grep "serve row" "$OUT/serve.log" | cut -c1-420 ;;
  quantize)
    timeout 580 python3 -m onediffx bench model=sdxl model.synthetic=true 'bench.scenarios=[quantize]' \
      'bench.quantize_modes=[fp8]' hydra.run.dir="$OUT/quantize" > "$OUT/quantize.log" 2>&1
    echo "quantize rc=$?"; tail -25 "$OUT/quantize.log" | cut -c1-300 ;;
  *) echo "usage: $0 fill|serve|quantize" >&2; exit 2 ;;
esac
