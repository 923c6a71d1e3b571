#!/bin/bash
# One lease in one or two calls: setup, the llama.cpp build and the 1.1B Q8_0/Q4_K_M files in
# the background, tests/test_gpu.py, then ggforge bench beside llama-bench (NGL=all,half) if
# the build is done in time; a second call within the warm window finishes the benches.
#   run(command="bash scripts/device/phase.sh 2>&1", carry=[".dev"])   (.dev: see docs/gpu.md)
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
G="bash scripts/device/gpu_session.sh"
T0=$SECONDS; el() { echo $((SECONDS-T0)); }
if [ ! -f /tmp/phase1 ]; then
  nproc; free -g | head -2; df -h /tmp | tail -1
  $G setup build 2>&1 | tee $OUT/setup.log
  ( S=$SECONDS; $G big; echo "q8 done $((SECONDS-S))s"; $G big4; echo "q4 done $((SECONDS-S))s"; ls -la /tmp/big ) > $OUT/big.log 2>&1 &
  BP=$!
  timeout 420 $G tests; echo "tests done at $(el)s"
  wait $BP; cat $OUT/big.log; echo "big done at $(el)s"
  touch /tmp/phase1
fi
cp /tmp/lc/build.log $OUT/build.log 2>/dev/null
LB=/tmp/lc/llama.cpp/build/bin/llama-bench
LEFT=$(( ${BUDGET:-570} - $(el) ))
echo "left $LEFT s; build: $([ -x $LB ] && echo done || (grep -o '\[ *[0-9]*%\]' /tmp/lc/build.log | tail -1))"
if [ $LEFT -gt 300 ] || [ -x $LB ]; then
  WAIT=$(( (LEFT - 240) / 5 )) $G waitbuild
  for m in big-q8_0 big-q4_k_m; do
    [ -f /tmp/bench_$m ] && continue
    [ -x $LB ] || break
    echo "== $m at $(el)s"
    BENCH_MODEL=/tmp/big/$m.gguf NGL=all,half $G bench && touch /tmp/bench_$m
    echo "== $m done at $(el)s"
    [ $(( ${BUDGET:-570} - $(el) )) -gt 200 ] || break
  done
fi
cp /tmp/lc/build.log $OUT/build.log 2>/dev/null
ls /tmp/bench_* 2>/dev/null; echo "end at $(el)s"
