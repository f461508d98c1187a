#!/usr/bin/env bash
# One run on a GPU machine: build the CUDA extension, run the CUDA tests, compute-sanitizer on a representative
# test, register/spill report (-Xptxas -v), SASS grep for the intended instructions, benchmark table.
#
#   bash scripts/gpu_check.sh [STAGE ...]   # from the repository root; logs go to $OUT (or ./gpu_check_out)
#
# STAGEs (default: all, in this order): build sass test bench sanitize. The order puts the slow sanitizer runs
# last so that a short lease still returns the test results and the table.
#
# Environment: PYTHON (default python3, the interpreter that has a CUDA torch), QUANTKIT_CUDA_TEST_EXAMPLES
# (hypothesis examples per test, default 30), BENCH_ARGS (default --quick). Budget: about 8 minutes on an H100.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export QUANTKIT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"} MAX_JOBS=${MAX_JOBS:-16}
export QUANTKIT_CUDA_TEST_EXAMPLES=${QUANTKIT_CUDA_TEST_EXAMPLES:-30}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SUMMARY=()
T0=$(date +%s)
STAGES=" ${*:-build sass test bench sanitize} "
want() { [[ "$STAGES" == *" $1 "* ]]; }
step() { echo; echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
record() { SUMMARY+=("$1: $2"); echo ">>> $1: $2"; }

step "device"
nvidia-smi --query-gpu=name,compute_cap,clocks.sm,clocks.max.sm,clocks.mem,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
CC=$($PY -c "import torch; m,n=torch.cuda.get_device_capability(); print(m*10+n)" 2>/dev/null || echo 0)

if want build; then
step "build (QUANTKIT_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
rm -f quantkit/_C*.so
if $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
  record build PASS
else
  record build FAIL; tail -60 "$OUT/build.log"
fi
fi
ls -la quantkit/_C*.so 2>&1
$PY -c "import torch, quantkit.ops._load as l; l.load(); print(l.status()); print(torch.ops.quantkit.cuda_backend_info())" 2>&1 | tee "$OUT/backend_info.txt"

if want sass; then
step "register / spill report (-Xptxas -v), in the background"
(
  INC=$($PY -c "from torch.utils.cpp_extension import include_paths as p
try: print(' '.join('-I'+x for x in p(device_type='cuda')))
except TypeError: print(' '.join('-I'+x for x in p(cuda=True)))")
  PYINC=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  STD=-std=c++20
  for f in kernels/cuda/bgemm.cu kernels/cuda/bgemm_simt.cu; do
    for arch in 80 90; do
      nvcc $INC -I"$PYINC" -Ikernels $STD --expt-relaxed-constexpr -O3 -Xcompiler -fPIC \
        -gencode=arch=compute_$arch,code=sm_$arch -Xptxas -v -c "$f" -o /dev/null 2>&1 | sed "s|^|sm_$arch $f: |"
    done
  done
  nvcc -Ikernels -I"$PYINC" $STD -O3 -Xcompiler -fPIC -gencode=arch=compute_90a,code=sm_90a -Xptxas -v \
    -c kernels/cuda/sm90a/bgemm_wgmma.cu -o /dev/null 2>&1 | sed "s|^|sm_90a wgmma: |"
) > "$OUT/ptxas.log" 2>&1 &
PTXAS_PID=$!

step "SASS: b1 MMA (BMMA / BGMMA) and VABSDIFF4 in the built libraries"
C_SO=$(ls quantkit/_C.*.so 2>/dev/null | head -1)
S_SO=$(ls quantkit/_C_sm90a*.so 2>/dev/null | head -1)
if [ -n "$C_SO" ]; then
  cuobjdump -sass "$C_SO" > "$OUT/sass_C.txt" 2>&1
  NB=$(grep -c "BMMA.168256.AND.POPC" "$OUT/sass_C.txt"); NV=$(grep -c "VABSDIFF4" "$OUT/sass_C.txt")
  NX=$(grep -c "BMMA.*XOR" "$OUT/sass_C.txt")
  echo "_C: BMMA.168256.AND.POPC x$NB, VABSDIFF4 x$NV, XOR BMMA x$NX"
  grep -oE "(BMMA|VABSDIFF4|POPC|LDGSTS)[.A-Z0-9_]*" "$OUT/sass_C.txt" | sort | uniq -c
  [ "$NB" -gt 0 ] && [ "$NV" -gt 0 ] && [ "$NX" -eq 0 ] && record sass_C PASS || record sass_C FAIL
else
  record sass_C "FAIL (no _C library)"
fi
if [ -n "$S_SO" ]; then
  cuobjdump -sass "$S_SO" > "$OUT/sass_sm90a.txt" 2>&1
  NG=$(grep -c "BGMMA" "$OUT/sass_sm90a.txt")
  grep -oE "(BGMMA|WARPGROUP|LDGSTS)[.A-Z0-9x_]*" "$OUT/sass_sm90a.txt" | sort | uniq -c
  [ "$NG" -gt 0 ] && record sass_sm90a "PASS (BGMMA x$NG)" || record sass_sm90a FAIL
else
  record sass_sm90a "FAIL (no _C_sm90a library)"
fi

fi

if want test; then
step "CUDA tests (hypothesis vs references, every kernel path)"
EXPECT=0; [ "$CC" = "90" ] && EXPECT=1
TO=""; $PY -c "import pytest_timeout" 2>/dev/null && TO="--timeout=200"
if QUANTKIT_EXPECT_SM90A=$EXPECT timeout 420 $PY -m pytest -q -rs $TO tests/test_cuda_kernels.py -p no:cacheprovider \
    > "$OUT/tests.log" 2>&1; then
  record tests PASS
else
  record tests "FAIL (see tests.log)"
fi
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
fi

if want sass; then
step "ptxas report"
wait $PTXAS_PID
awk '/Compiling entry function/ { name = $0; sub(/.*function ./, "", name); sub(/. for .*/, "", name);
                                    if (length(name) > 70) name = "..." substr(name, length(name) - 66) }
     /bytes stack frame/ { match($0, /[0-9]+ bytes stack frame.*/); frame = substr($0, RSTART) }
     /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); print substr($0, 1, index($0, ":")) " " name " | " substr($0, RSTART, RLENGTH) " | " frame }' \
  "$OUT/ptxas.log" | head -40
grep -qE "[1-9][0-9]* bytes spill (stores|loads)" "$OUT/ptxas.log" && record spills "SOME (see ptxas.log)" || record spills none
grep -E "warning" "$OUT/ptxas.log" | head -5
fi

if want bench; then
step "benchmark"
$PY benchmarks/gpu.py ${BENCH_ARGS:---quick} --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -70
fi

if want sanitize; then
step "compute-sanitizer (memcheck, racecheck) on scripts/cuda_sanitize_case.py (every kernel path once)"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # so memcheck sees the true bounds of each tensor
for tool in memcheck racecheck; do
  if timeout 120 compute-sanitizer --tool $tool --error-exitcode 99 $PY scripts/cuda_sanitize_case.py \
      > "$OUT/$tool.log" 2>&1; then
    record $tool PASS
  else
    record $tool "FAIL rc=$? (see $tool.log)"; grep -m15 -E "ERROR SUMMARY|Invalid|Race|hazard|Barrier|failures|Error" "$OUT/$tool.log"
  fi
  tail -2 "$OUT/$tool.log"
done
unset PYTORCH_NO_CUDA_MEMORY_CACHING
fi

echo; echo "=== summary ($(( $(date +%s) - T0 ))s)"
for s in "${SUMMARY[@]}"; do echo "  $s"; done
for s in "${SUMMARY[@]}"; do echo "$s"; done > "$OUT/summary.txt"
