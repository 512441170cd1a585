# retinaedge: one entry point for set-up, tests and the appliance's jobs.
# Every target installs what it needs into .venv; nothing has to be installed by hand.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch/torchvision are the `export` extra. Pinned so that a machine without a local wheel cache
# resolves the same CPU-capable release instead of the newest CUDA build.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: help venv runtime demo benchmark benchmark-r50 test lint pytest clean docker docker-base docker-jetson

help:
	@echo "make demo    install the runtime (no torch) into .venv if needed, serve the demo model,"
	@echo "             send the sample studies (STOW-RS and /v1/detect), print findings, write overlays"
	@echo "make benchmark  install the runtime + export extra into .venv if needed, benchmark MODEL"
	@echo "             (default models/demo) on the example DICOM, write report.json, report.md and"
	@echo "             latency.png to OUT (default benchmark-output); BENCH_ARGS= passes more options"
	@echo "make benchmark-r50  the same report for a ResNet-50-FPN RetinaNet at 512 x 512 (random seeded"
	@echo "             weights, exported into the benchmark's cache the first time) -> R50_OUT (benchmark-r50)"
	@echo "make test    create .venv, install runtime + export + dev extras, run make lint and pytest"
	@echo "make lint    ruff, the import rules (lint-imports) and the type checker (mypy, tools/typecheck.py)"
	@echo "make docker  build the x86_64 image (ONNX Runtime on CPU): retinaedge:VERSION and :latest"
	@echo "             (DOCKER=podman DOCKER_BUILD_FLAGS=... PYTHON_IMAGE=...: docker/README.md)"
	@echo "make docker-base  make a local base for the x86 image with mmdebstrap (root), print its tag"
	@echo "make docker-jetson  build the Jetson image (JetPack 6, TensorRT): retinaedge-jetson:VERSION"
	@echo "             and :latest; on a non-arm64 host through docker buildx --platform linux/arm64"
	@echo "             (needs QEMU binfmt). See docker/README.md"
	@echo "make clean   remove .venv and caches"

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	touch $@

# Runtime + dev tools + the export extra (the tests export real torchvision models) + the openvino extra
# (tests/runtime/backends/test_openvino*.py). The stamp depends on pyproject.toml: a new extra reinstalls.
$(VENV)/.test-deps: $(VENV)/.created pyproject.toml
	$(PIP) install --quiet $(TORCH_PINS)
	$(PIP) install --quiet -e ".[export,dev,openvino]"
	# tritonserver 2.51 (python backend only) for tests/runtime/backends/test_triton_serving.py, without the
	# wheel's numpy<2 pin; its python backend stub needs numpy<2, kept apart in .venv/triton-python-env
	# (tools/triton_local.py).
	$(PIP) install --quiet --no-deps nvidia-pytriton==0.7.0
	$(PIP) install --quiet --no-deps --upgrade --target $(VENV)/triton-python-env numpy==1.26.4
	touch $@

venv: $(VENV)/.test-deps

# The runtime alone (what the appliance and the demo need): no torch. Quick when .venv already has
# it (for example from `make test`).
$(VENV)/.runtime-deps: $(VENV)/.created pyproject.toml
	$(PIP) install --quiet -e .
	touch $@

runtime: $(VENV)/.runtime-deps

# The appliance's main job on the bundled demo model and sample studies; overlays in demo-output/.
demo: $(VENV)/.runtime-deps
	$(PY) tools/demo.py --model models/demo --examples examples --out demo-output

# The runtime + the export extra: torch/torchvision for the torchvision eager baseline.
$(VENV)/.bench-deps: $(VENV)/.created pyproject.toml
	$(PIP) install --quiet $(TORCH_PINS)
	$(PIP) install --quiet -e ".[export,openvino]"
	touch $@

MODEL ?= models/demo
OUT ?= benchmark-output
BENCH_ARGS ?=

# What a technician runs on the target: per-stage latency, baselines, HTTP overhead, throughput, memory,
# energy (Jetson). Another bundle: make benchmark MODEL=models/r50 BENCH_ARGS="--checkpoint r50.pth".
benchmark: $(VENV)/.bench-deps
	$(VENV)/bin/retinaedge benchmark --model $(MODEL) --out $(OUT) $(BENCH_ARGS)

# The model size users bring: a ResNet-50-FPN RetinaNet at 512 x 512 with seeded random weights, exported
# into the benchmark's cache the first time (minutes), then the same report (docs/operations.md).
# R50_ARGS: fewer frames than the demo's 60 (a frame costs about 20x more); BENCH_ARGS still adds options.
R50_OUT ?= benchmark-r50
R50_ARGS ?= --frames 20 --batch-sizes 1,2,4 --tail-seconds 120
benchmark-r50: $(VENV)/.bench-deps
	$(VENV)/bin/retinaedge benchmark --config r50-fpn-512 --out $(R50_OUT) $(R50_ARGS) $(BENCH_ARGS)

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff check export runtime device service bench tests tools docker
	$(VENV)/bin/ruff format --check export runtime device service bench tests tools docker
	$(VENV)/bin/lint-imports --no-cache
	$(PY) tools/typecheck.py

pytest: $(VENV)/.test-deps
	$(VENV)/bin/pytest

test: lint pytest

# Container images (docker/README.md). The build context is the repository root; .dockerignore allowlists
# what the images use. Building needs a Docker engine with BuildKit (docker build / buildx), or podman:
#   make docker DOCKER=podman DOCKER_BUILD_FLAGS="--format docker"
# DOCKER_BUILD_FLAGS go to every build (podman: --format docker keeps the HEALTHCHECK). PYTHON_IMAGE, when
# set, replaces the x86 image's base (python:3.11-slim-trixie); `make docker-base` makes one locally with
# mmdebstrap (as root; for machines that cannot reach Docker Hub) and prints its tag.
DOCKER       ?= docker
DOCKER_BUILD_FLAGS ?=
PYTHON_IMAGE ?=
IMAGE        ?= retinaedge
JETSON_IMAGE ?= retinaedge-jetson
JETSON_BASE  ?= nvcr.io/nvidia/l4t-jetpack:r36.4.0
VERSION      := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
HOST_ARCH    := $(shell uname -m)

docker:
	$(DOCKER) build $(DOCKER_BUILD_FLAGS) -f docker/Dockerfile --build-arg VERSION=$(VERSION) \
		$(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) \
		-t $(IMAGE):$(VERSION) -t $(IMAGE):latest .

# The same recipe and tag as tests/deploy/test_container.py (BASE_RECIPE), so either one reuses the other's
# base.
BASE_RECIPE := mmdebstrap --variant=minbase --dpkgopt=path-exclude=/usr/share/man/* --dpkgopt=path-exclude=/usr/share/locale/* --dpkgopt=path-exclude=/usr/share/doc/* --dpkgopt=path-include=/usr/share/doc/*/copyright --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates bookworm
BASE_TAG    := localhost/retinaedge-base:$(shell printf '%s' "$(BASE_RECIPE)" | sha256sum | cut -c1-24)

docker-base:
	@set -f; if $(DOCKER) image inspect $(BASE_TAG) >/dev/null 2>&1; then echo "$(BASE_TAG) (cached)"; else \
		tmp=$$(mktemp -d) && $(BASE_RECIPE) $$tmp/base.tar && $(DOCKER) import $$tmp/base.tar $(BASE_TAG); \
		status=$$?; rm -rf $$tmp; [ $$status -eq 0 ] && echo "$(BASE_TAG)"; fi

ifeq ($(filter $(HOST_ARCH),aarch64 arm64),)
JETSON_BUILD := $(DOCKER) buildx build --platform linux/arm64 --load
else
JETSON_BUILD := $(DOCKER) build
endif

docker-jetson:
	$(JETSON_BUILD) $(DOCKER_BUILD_FLAGS) -f docker/Dockerfile.jetson --build-arg VERSION=$(VERSION) \
		--build-arg BASE_IMAGE=$(JETSON_BASE) -t $(JETSON_IMAGE):$(VERSION) -t $(JETSON_IMAGE):latest .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
