# The two commands of the README: `make serve` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKOV := $(VENV)/tools-checkov/bin/checkov

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

# checkov in its own venv: its pins would downgrade the project's packages.
$(CHECKOV): deploy/tools/install-checkov.sh | $(STAMP)
	deploy/tools/install-checkov.sh $(PYTHON)

test: lint $(CHECKOV)
	$(BIN)/python -m pytest -q $(ARGS)

protos: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH protos/generate.sh

clean:
	rm -rf $(VENV)
