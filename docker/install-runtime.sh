#!/bin/sh
# Install the retinaedge runtime into a fresh virtual environment, the one way the images and the
# wheel-install test (tests/deploy/test_docker_wheel.py) both do it.
#
#   docker/install-runtime.sh [--system-site-packages] [--require MODULE]... WHEEL_DIR VENV
#
# WHEEL_DIR holds the retinaedge wheel (`pip wheel --no-deps .`) and any wheels built beside it (pycuda
# in the Jetson image). Every *.whl in it is installed with its dependencies, no extras: the `export`
# extra would bring torch, and the `trt` extra would ask PyPI for a tensorrt that is not JetPack's (the
# Jetson image sees the base image's TensorRT through --system-site-packages instead).
# Only binary distributions are accepted (--only-binary=:all:): the runtime stages have no compiler,
# so a dependency without a wheel for this platform fails here, by name, instead of half-building.
#
# Afterwards it checks that torch is NOT importable, that every --require module is found (by
# importlib.util.find_spec, without importing: pycuda needs libcuda, which only the container runtime
# mounts), that `pip check` is clean (without --system-site-packages) and that `retinaedge --help` runs.
#
# Environment: PYTHON (interpreter that creates the venv, default python3); pip's own variables
# (PIP_NO_CACHE_DIR, PIP_INDEX_URL, ...) pass through.
set -eu

usage() {
    echo "usage: $0 [--system-site-packages] [--require MODULE]... WHEEL_DIR VENV" >&2
    exit 64
}

venv_args=""
require=""
while [ $# -gt 0 ]; do
    case "$1" in
        --system-site-packages) venv_args="--system-site-packages"; shift ;;
        --require) [ $# -ge 2 ] || usage; require="$require $2"; shift 2 ;;
        --*) usage ;;
        *) break ;;
    esac
done
[ $# -eq 2 ] || usage
wheel_dir=$1
venv=$2
python=${PYTHON:-python3}

set -- "$wheel_dir"/*.whl
[ -e "$1" ] || { echo "install-runtime: no wheel in $wheel_dir" >&2; exit 1; }
found=no
for whl in "$@"; do
    case "$(basename "$whl")" in retinaedge-*) found=yes ;; esac
done
[ "$found" = yes ] || { echo "install-runtime: no retinaedge wheel in $wheel_dir" >&2; exit 1; }

# shellcheck disable=SC2086  # venv_args is empty or one word
"$python" -m venv $venv_args "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: \
    --find-links "$wheel_dir" "$@"

"$venv/bin/python" - $require <<'EOF'
import importlib.util
import sys

if importlib.util.find_spec("torch") is not None:
    sys.exit("install-runtime: torch is installed in the runtime environment; it must not be")
missing = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"install-runtime: required module(s) not found: {', '.join(missing)}")
EOF
# pip check looks at every distribution on sys.path; with --system-site-packages that includes the
# base image's Debian packages, whose metadata is not ours to fix.
if [ -z "$venv_args" ]; then
    "$venv/bin/python" -m pip check --disable-pip-version-check
fi
"$venv/bin/retinaedge" --help >/dev/null
echo "install-runtime: retinaedge installed in $venv"
