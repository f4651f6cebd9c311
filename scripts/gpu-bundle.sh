#!/usr/bin/env bash
# For a GPU machine without network access whose python3 already holds torch (and torchvision,
# numpy, matplotlib, click, pillow, onnx): packs what else scripts/gpu-check.sh needs into
# .gpu-bundle/ (git-ignored, about 40 MB): wheels of the rest of the stack for that machine's Python,
# and the Fashion-MNIST files. Copy the checkout with .gpu-bundle/ there and run gpu-check.sh.
#   bash scripts/gpu-bundle.sh [PYTHON_VERSION]      (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
bundle=.gpu-bundle
rm -rf "$bundle" && mkdir -p "$bundle/wheels" "$bundle/fashion-mnist"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
# optuna, optuna-dashboard and what they need beyond a PyTorch image: no dependency resolution
# (--no-deps), so every one is named; the versions follow pyproject.toml's ranges.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  "${platforms[@]}" -d "$bundle/wheels" \
  "optuna>=5,<6" "optuna-dashboard>=0.21,<1" "sqlalchemy>=2,<3" alembic mako colorlog bottle greenlet tqdm 2>&1 \
  | grep -v "^WARNING: Location" || true
data=$(.venv/bin/python -c "from hpo.learn.data import find_data_dir; print(find_data_dir())" 2>/dev/null \
  || echo /usr/share/datasets/fashion-mnist)
cp "$data"/*-ubyte* "$bundle/fashion-mnist/"
du -sh "$bundle" "$bundle"/*
