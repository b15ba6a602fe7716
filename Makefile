# Two commands on a fresh machine: `make demo` and `make test`. Both create the
# virtual environment and install what they need first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-runtime
ZOO_STAMP := $(VENV)/.installed-zoo
OUT ?= out

.PHONY: venv demo test test-all lint zoo bench-stitch clean

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

# The main job: partition every family of the embedded zoo, measure the variants and
# the stitched configs, write $(OUT)/demo/demo.json and one Pareto plot per task.
demo: venv
	$(BIN)/loom demo --out $(OUT)/demo

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

bench-stitch: venv
	$(BIN)/python scripts/bench_stitch.py --out $(OUT)/bench_stitch.json

clean:
	rm -rf $(OUT) .pytest_cache
