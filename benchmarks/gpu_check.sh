#!/usr/bin/env bash
# CUDA checks, run on a machine with a GPU and a CUDA build of torch (its own python3):
#   the CUDA-only tests, the whole suite with device "auto" = CUDA, the injection benchmark on the GPU.
#   OUT=<folder> bash benchmarks/gpu_check.sh      (logs land in $OUT, default gpu-check/)
# Wheels of packages the machine lacks (bitstring, bitarray) may be put in .whl/ beforehand.
set -uo pipefail
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
"$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
echo "== CUDA tests"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -rs tests/ -k cuda 2>&1 | tee "$OUT/cuda_tests.log" | tail -6
echo "== whole suite, campaigns on CUDA"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/all_tests.log" | tail -25
echo "== injection benchmark on CUDA"
timeout 150 "$PY" benchmarks/bench_inject.py --device cuda --quick 2>&1 | tee "$OUT/bench_inject_cuda.log"
echo "== ViT-B/16 evaluation throughput (capacity planning)"
timeout 120 "$PY" - <<'PY' 2>&1 | tee "$OUT/throughput.log"
import time, torch
from qfi.zoo.vit import vit_b_16_shaped
m = vit_b_16_shaped().cuda().eval()
for batch in (1, 64, 256):
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            m(x)
        torch.cuda.synchronize()
        ts = []
        for _ in range(10):
            t = time.perf_counter(); m(x); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    ts.sort()
    print(f"ViT-B/16 fp32 forward, batch {batch}: {ts[5] * 1e3:.2f} ms = {batch / ts[5]:.0f} images/s")
PY
