# Two commands for a fresh machine: `make demo` (set up .venv on first use, run the main job)
# and `make test` (set up .venv on first use, lint, run the whole suite). VENV=... picks another venv.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/fseg train --epochs 3 --size 64 --model segnet --model-cfg widths=16,32,64,64

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2
