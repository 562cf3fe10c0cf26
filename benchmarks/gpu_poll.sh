#!/usr/bin/env bash
# One device call: install the carried wheels (once per machine), start gpu_session7.sh if it has
# not started on this machine, wait up to $1 seconds for it, and send back its logs and results.
cd "$(dirname "$0")/.."
[ -f /tmp/site/.ok ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && touch /tmp/site/.ok; } || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p outputs; [ -f outputs/c7/progress ] || { setsid nohup bash benchmarks/gpu_session7.sh > outputs/c7.out 2>&1 < /dev/null & sleep 2; }
end=$((SECONDS + ${1:-560}))
while [ $SECONDS -lt $end ] && ! grep -q done outputs/c7/progress 2>/dev/null; do sleep 10; done
cat outputs/c7/progress; du -sh outputs/graphs 2>/dev/null
for f in outputs/c7/*.log; do echo "== $f"; grep -E "bench .* row|compiled a graph|Error|error|passed|failed" "$f" | tail -8; done
tar czf "$OUT/c7.tgz" --exclude='*.png' outputs/c7 2>/dev/null; ls -la "$OUT"
