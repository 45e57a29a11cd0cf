#!/usr/bin/env bash
# One-command accelerator run: the op-level suite and the ResNet-18 training step, with a
# report in benchmarks/RESULTS-<device>.md (raw results in benchmarks/device-<device>/).
#
#   bash benchmarks/device.sh                     # on a machine with one GPU and JAX's CUDA build (< 8 minutes)
#   bash benchmarks/device.sh --dry-run --out DIR # tiny sizes on any backend, e.g. CPU in CI
#
# Uses $PYTHON (default python3), which must import jax, flax and optax; haiku, equinox,
# torch, tqdm and matplotlib are used where importable. Nothing is installed or downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import jax, flax, optax" 2>/dev/null; then
  echo "device.sh: '$PYTHON' cannot import jax, flax and optax; set PYTHON to an interpreter that has them" >&2
  exit 2
fi
exec "$PYTHON" -m benchmarks.device "$@"
