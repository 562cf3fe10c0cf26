#!/usr/bin/env bash
# The seventh session's H200 run, started detached (it outlasts one 10-minute device call) and
# polled by later calls: fill the graph cache (serve's shapes and batch sizes; fp8 beside it),
# then the serve and quantize benches in turn on a quiet machine, each loading those graphs.
set -u
cd "$(dirname "$0")/.."
C=outputs/c7
G=$PWD/outputs/graphs
mkdir -p "$C"
step() { echo "[$(date +%T)] $*" >> "$C/progress"; }
step start
python3 benchmarks/sdpa_check.py "$C/sdpa.json" > "$C/sdpa.log" 2>&1; step "sdpa rc=$?"
SHAPES='{height:1024,width:1024,batch:1},{height:768,width:1024,batch:1},{height:1024,width:1024,batch:2},{height:768,width:1024,batch:2}'
python3 -m onediffx run model=sdxl model.synthetic=true compile=inductor steps=2 cache.dir="$G" \
  "warmup.shapes=[$SHAPES]" hydra.run.dir="$C/fill_serve" > "$C/fill_serve.log" 2>&1 &
F1=$!
sleep 20
python3 -m onediffx run model=sdxl model.synthetic=true compile=inductor quantize=fp8 quantize.quality=false \
  steps=2 cache.dir="$G" hydra.run.dir="$C/fill_fp8" > "$C/fill_fp8.log" 2>&1 &
F2=$!
python3 -m pytest -q -p no:cacheprovider -m gpu tests > "$C/gpu_tests.log" 2>&1; step "gpu tests rc=$?"
wait $F1; step "fill_serve rc=$?"
wait $F2; step "fill_fp8 rc=$?"
python3 -m onediffx bench model=sdxl model.synthetic=true compile=inductor 'bench.scenarios=[serve]' \
  bench.serve_requests=16 bench.serve_max_batch=2 bench.serve_cache="$G" cache.dir="$G" \
  hydra.run.dir="$C/serve" > "$C/serve.log" 2>&1; step "serve rc=$?"
python3 -m onediffx bench model=sdxl model.synthetic=true compile=inductor 'bench.scenarios=[quantize]' \
  'bench.quantize_modes=[fp8]' cache.dir="$G" hydra.run.dir="$C/quantize" > "$C/quantize.log" 2>&1; step "quantize rc=$?"
step done
