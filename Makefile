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
	$(PY) -m pip install -q -e ".[dev,docs]"
	touch $@

.PHONY: venv run test bench
venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/metapt run molecules

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/hypergrad_cost.py

# The documentation site (mkdocs + mkdocstrings), built from docs/ and the docstrings into
# build/docs; any warning is an error.
.PHONY: docs
docs: venv
	$(VENV)/bin/mkdocs build --strict

# Side by side with Betty and TorchOpt (issue 7), in a venv of its own: peers are not dependencies.
PEERS_VENV ?= benchmarks/.peers-venv

$(PEERS_VENV)/.installed: pyproject.toml benchmarks/peers-requirements.txt
	python3 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(PEERS_VENV)/bin/pip install -q -e . -r benchmarks/peers-requirements.txt
	$(PEERS_VENV)/bin/pip install -q --no-deps --ignore-requires-python betty-ml==0.2.1
	touch $@

.PHONY: bench-peers
bench-peers: $(PEERS_VENV)/.installed
	OMP_NUM_THREADS=1 $(PEERS_VENV)/bin/python benchmarks/peers.py --out benchmarks/results/peers.json --md benchmarks/results/peers.md
