#!/usr/bin/env bash
# Install the peer libraries the benchmarks compare against, without letting pip replace torch:
# curvlinops-for-pytorch depends on backpack-for-pytorch -> torchvision, which would pull a new torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e ".[bench]"
python -m pip install --no-deps curvlinops-for-pytorch pyhessian hessian-eigenthings
python -c "import torch; print('torch', torch.__version__)"
