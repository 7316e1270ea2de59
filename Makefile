# Two entry points: `make up` runs the farm, `make test` runs the tests.
# Both create and use the virtual environment at .venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# `make up` serves the tiny random-weight checkpoint unless told otherwise, so it
# works offline; set KOLORS_FARM_MODEL=Kwai-Kolors/Kolors-diffusers for real images.
export KOLORS_FARM_MODEL ?= tiny

.PHONY: up test lint venv system-packages clean gpu-wheels gpu-bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a bare requirement could pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet 'torch==2.13.0'
	$(BIN)/pip install --quiet -e '.[worker,dev]'
	touch $(STAMP)

up: $(STAMP)
	$(BIN)/kolors-farm up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Debian packages the tests drive (Chromium, docker-compose), installed when missing.
system-packages:
	bash tools/system-packages.sh

# Two test processes, each taking whole files: most tests wait on real processes, so two
# share two cores well, and a file's farm (module fixtures) starts once.
test: $(STAMP) system-packages lint
	$(BIN)/pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache

# The GPU benchmark (docs/gpu.md). `gpu-wheels` downloads, here, the wheels a GPU machine
# without a package index needs (cp312 manylinux x86-64) into .gpu-wheels/ and checks them;
# `gpu-bench` runs every stage (bench/gpu/run.sh installs those wheels where needed).
GPU_WHEELS := .gpu-wheels
GPU_OUT ?= var/gpu-bench
GPU_BENCH_ARGS ?=
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)

gpu-wheels: $(STAMP)
	$(BIN)/python bench/gpu/wheels.py download $(GPU_WHEELS)

gpu-bench:
	PYTHON=$(GPU_PYTHON) GPU_WHEELS=$(GPU_WHEELS) bash bench/gpu/run.sh $(GPU_OUT) $(GPU_BENCH_ARGS)
