#!/bin/bash
# GPU checks and benchmarks on a lent CUDA machine (bare image: torch, Triton, numba there).
#   bash scripts/device/gpu_session.sh STEP...
#   steps: setup build tests big big4 big7 profile bench sweep waitbuild piece gemma layers lgreedy
# Everything here goes through the package's public API (ggforge.load, Model, the CLI).
# .dev/ (git-ignored: .git/info/exclude) carries the gguf wheel (and any other wheel the
# image lacks; `setup` installs every .dev/*.whl) and llama.cpp's trimmed source (lcpp.tar.xz);
# .dev2/g0..g4 the real Gemma-3-270M Q4_K_M file in five pieces (a call carries 64 MiB at
# most, and a carried path is gone at the next call: carry one piece a call, step `piece`
# copies it to /tmp/g, on a machine kept warm). Results go to $OUT.
set -u
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/ggforge
export PYTHONPATH=/tmp/site:/tmp/pkg
LB=/tmp/lc/llama.cpp/build/bin/llama-bench
BIG=/tmp/big/big-q8_0.gguf
BIG4=/tmp/big/big-q4_k_m.gguf
BIG7=/tmp/big7/big7-q8_0.gguf
for step in "$@"; do case $step in
setup)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .dev/*.whl 2>&1 | tail -1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, numba, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)" ;;
build)   # llama.cpp with CUDA, in the background (setsid: outlives this command)
  mkdir -p /tmp/lc && tar xJf .dev/lcpp.tar.xz -C /tmp/lc
  (cd /tmp/lc/llama.cpp && setsid nohup bash -c "cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
     -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
     -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON && cmake --build build --target llama-bench llama-completion -j 12" \
     > /tmp/lc/build.log 2>&1 < /dev/null &) ;;
tests)   # TESTS="expr" for a subset (pytest -k)
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py ${TESTS:+-k "$TESTS"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
big)     # a generated 1.1B-parameter llama (TinyLlama shape), Q8_0: 1.17 GB
  python3 -c 'from ggforge.convert.synthetic import SHAPES, write_random_checkpoint as w; w("/tmp/big/src", SHAPES["1.1b"], "models/pystdlib-6m")'
  python3 -m ggforge.tools quantize /tmp/big/src q8_0 -o $BIG --no-progress 2>&1 | tail -2 ;;
big4)    # the same generated 1.1B checkpoint (written if `big` did not), Q4_K_M (`quantize ... q4`)
  [ -f /tmp/big/src/config.json ] || python3 -c 'from ggforge.convert.synthetic import SHAPES, write_random_checkpoint as w; w("/tmp/big/src", SHAPES["1.1b"], "models/pystdlib-6m")'
  python3 -m ggforge.tools quantize /tmp/big/src q4 -o $BIG4 --no-progress 2>&1 | tail -2 ;;
big7)    # a generated 5.9B-parameter llama (Llama-2-7B widths, 8 kv heads), Q8_0: 6.3 GB
  python3 -c 'from ggforge.convert.synthetic import SHAPES, write_random_checkpoint as w; w("/tmp/big7/src", SHAPES["7b"], "models/pystdlib-6m")'
  python3 -m ggforge.tools quantize /tmp/big7/src q8_0 -o $BIG7 --no-progress 2>&1 | tail -2
  rm -rf /tmp/big7/src ;;
profile) # where a decode step's GPU time goes (PROFILE_MODEL, default the 1.1B file)
  python3 scripts/device/gpu_profile.py ${PROFILE_MODEL:-$BIG} 2>&1 | tee "$OUT/profile.log" | head -45 ;;
lgreedy) # llama.cpp's own GPU against its CPU, greedy, on the real model (after `gemma`)
  (cd scripts/device && python3 lcpp_greedy.py /tmp/lc/llama.cpp/build/bin/llama-completion /tmp/gemma.gguf) 2>&1 | tee "$OUT/lgreedy.log" ;;
layers)  # the real model, layer by layer: GPU against CPU (after `gemma` assembled it)
  python3 scripts/device/layer_check.py /tmp/gemma.gguf 2>&1 | tee "$OUT/layers.log" ;;
bench)   # BENCH_MODEL (default the 1.1B Q8_0 file): ggforge at NGL (0,half,all), REPS runs, + llama-bench when built
  M=${BENCH_MODEL:-$BIG}
  [ -x $LB ] || { echo "llama-bench not built yet:"; tail -3 /tmp/lc/build.log; }
  python3 -m ggforge.tools bench $M -p 512 -n 128 -r ${REPS:-3} -ngl ${NGL:-0,half,all} \
     $([ -x $LB ] && echo --llama-bench $LB) 2>&1 | tee -a "$OUT/bench.log" | tail -8 ;;
sweep)   # Q8_0 decode tiles end to end (SWEEP_MODEL, default the 1.1B file): $OUT/q8_tiles.json
  python3 scripts/device/q8_sweep.py ${SWEEP_MODEL:-$BIG} 2>&1 | tee "$OUT/sweep.log" ;;
piece)   # keep the carried piece(s) of the Gemma file
  mkdir -p /tmp/g && cp .dev2/g* /tmp/g/ && ls /tmp/g ;;
gemma)   # the real model: GPU against CPU at 0, half, all layers (after five `piece` calls)
  cat /tmp/g/g0 /tmp/g/g1 /tmp/g/g2 /tmp/g/g3 /tmp/g/g4 > /tmp/gemma.gguf && sha256sum /tmp/gemma.gguf | cut -c1-16
  python3 scripts/device/real_check.py /tmp/gemma.gguf 2>&1 | tee "$OUT/real.log" ;;
waitbuild)
  for i in $(seq 1 ${WAIT:-60}); do [ -x $LB ] && break; sleep 5; done; tail -2 /tmp/lc/build.log ;;
esac; done
