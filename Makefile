# Two entry points do all the set-up on a fresh machine:
#   make run   -- the main job on the data that ships with metapt
#   make test  -- the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: venv run test bench
venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/metapt run molecules

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/hypergrad_cost.py
