# One-command set-up: every target that needs Python depends on the virtual environment.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test quickstart lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[cpu,hf,test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests -q

quickstart: install
	PYTHON=$(PY) bash examples/quickstart/run_cpu.sh

LINT_PATHS := megatron_ddk tools tests benchmarks pretrain_ddk.py

lint: install
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m mypy

clean:
	rm -rf $(VENV) quickstart_out
