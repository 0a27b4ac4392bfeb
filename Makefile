# One command installs everything from scratch (torch included) and runs the whole suite: `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint demo bench clean

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

clean:
	rm -rf $(VENV) outputs .pytest_cache
