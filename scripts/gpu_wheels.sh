#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels scripts/gpu_check.sh installs on the lent GPU machine:
# the packages hf_accinf needs that its image lacks (docs/ENGINE.md "Devices"; /work/.library/device/KINDS.md
# lists the image: torch, transformers, accelerate, safetensors, pyarrow, pandas, xxhash, fsspec are there;
# datasets, dill and multiprocess are not). Pure-Python wheels for the machine's Python 3.12, no dependencies.
# The folder .gpu_wheels/ is ignored by git; name it in the device tool's `carry`.
#   scripts/gpu_wheels.sh            # the versions installed here
#   DATASETS=5.2.0 scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
version() { python3 -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
DATASETS=${DATASETS:-$(version datasets)}
DILL=${DILL:-$(version dill)}
MULTIPROCESS=${MULTIPROCESS:-$(version multiprocess)}
rm -rf .gpu_wheels && mkdir -p .gpu_wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu_wheels "datasets==${DATASETS}" "dill==${DILL}" "multiprocess==${MULTIPROCESS}"
ls -l .gpu_wheels
du -sh .gpu_wheels
