#!/usr/bin/env bash
# The pure-Python packages trigact needs that the device machine's image lacks (its python3 3.12 has
# torch, lightning, torchmetrics, timm, safetensors, rich, scikit-learn), as wheels in .whl/ (ignored
# by git; carry it). Run here, where pip reaches the registry:
#   bash benchmarks/gpu_wheels.sh
# and on the device machine, before benchmarks/gpu_check.sh:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PIP=${PIP:-.venv/bin/python -m pip}
# Pinned as requirements.txt / requirements-nodeps.txt pin them.
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d .whl \
    hydra-core==1.3.8 omegaconf==2.3.0 torchattack==1.7.2 torchattacks==3.5.1 diffusers==0.42.1
# antlr4-python3-runtime 4.9.3 (omegaconf's parser) exists only as a source archive: build its wheel.
$PIP wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
du -sh .whl && ls .whl
