#!/usr/bin/env bash
# Installs the guard into a virtual environment at PREFIX, from the project source tree this
# script lives in: the one install step of both images (Dockerfile.cpu, Dockerfile.cuda), also
# run by the test suite (tests/test_deploy.py) so that a broken install line fails CI.
#
#   deploy/docker/install.sh PREFIX [cpu|cuda]
#
# cpu and cuda install the same packages: onnxruntime-gpu also runs on CPU, and the CUDA
# image takes CUDA and cuDNN from its base image (not from PyPI's `cuda` extra). Then it adds
# PREFIX/bin/guard-healthcheck (the gRPC health probe) and checks that both commands start.
set -euo pipefail

prefix="${1:?usage: install.sh PREFIX [cpu|cuda]}"
variant="${2:-cpu}"
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-python3}"

case "$variant" in
    cpu | cuda) ;;
    *) echo "install.sh: variant must be cpu or cuda, not '$variant'" >&2; exit 2 ;;
esac

"$python" -m venv "$prefix"
"$prefix/bin/pip" install --quiet --upgrade pip
"$prefix/bin/pip" install --quiet "$src"
install -m 0755 "$src/deploy/docker/healthcheck.py" "$prefix/bin/guard-healthcheck"
sed -i "1s|.*|#!$prefix/bin/python|" "$prefix/bin/guard-healthcheck"

"$prefix/bin/guard" --help >/dev/null
"$prefix/bin/guard-healthcheck" --help >/dev/null
"$prefix/bin/python" -c "import onnxruntime as ort; print('installed mps-guard', '$variant', 'onnxruntime', ort.__version__, ort.get_available_providers())"
