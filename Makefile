# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mdmt-installed
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[dev,timm,infer,slurm,xrv,tensorboard]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/mdmt demo

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: setup  # the CPU benchmarks (a few minutes each); gpu_throughput.py needs a CUDA device and is run by hand
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/grid_cost.py
	$(BIN)/python benchmarks/memory.py

clean:
	rm -rf demo-output demo-output-decoupled .mdmt-cache .pytest_cache
