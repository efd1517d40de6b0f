# The two commands of the README: `make serve` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint protos clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: nothing later may pull another torch.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet torch==2.13.0 -e clients/python -e ".[test]"
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/attrserve serve $(ARGS)

# ruff and mypy read their settings (and which files to check) from pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy
	cd protos && ../$(BIN)/buf lint

test: lint
	$(BIN)/python -m pytest -q $(ARGS)

protos: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH protos/generate.sh

clean:
	rm -rf $(VENV)
