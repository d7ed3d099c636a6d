#!/bin/bash
# The GPU measurement, as run on a lent machine (from the repository root):
#   bash studies/tensor_cores/gpu/run_device.sh OUTDIR
# Builds the mma.sync harness, runs device.py (harness, torch.matmul, ncu), writes OUTDIR.
set -u
G=studies/tensor_cores/gpu
OUTDIR=${1:?OUTDIR}
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/log.txt") 2>&1
date -u
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
command -v ncu >/dev/null || export PATH=$PATH:$(ls -d /opt/nvidia/nsight-compute/*/ 2>/dev/null | tail -1)
which nvcc ncu cuobjdump
nvcc --version | tail -2
python3 -c "import torch, numpy, ml_dtypes; print('torch', torch.__version__, 'numpy', numpy.__version__)"
nvcc -O2 -arch=sm_90 -o /tmp/mma_harness $G/mma_harness.cu || exit 1
cuobjdump --dump-sass /tmp/mma_harness > "$OUTDIR/sass.txt"; grep -oE "(HMMA|QMMA|IMMA|HGMMA|QGMMA)[.A-Z0-9]*" "$OUTDIR/sass.txt" | sort | uniq -c
PYTHONUNBUFFERED=1 timeout 330 python3 $G/device.py $G/inputs.npz /tmp/mma_harness "$OUTDIR"
