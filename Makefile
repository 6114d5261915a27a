# `make demo` and `make test` do all setup on a fresh machine (Python 3.10+ with venv).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	mkdir -p out
	$(VENV)/bin/qgraph demo -o out/digits_cnn_int8.onnx

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) benchmarks/bench_lower.py
	$(PY) benchmarks/bench_formats.py
	$(PY) benchmarks/bench_recipes.py
	$(PY) benchmarks/bench_ort.py
	$(PY) benchmarks/bench_onnx_door.py
