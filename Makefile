# The two commands of the README: `make serve` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two stamps: what serving needs (torch, the client, the server), then the test tools (the [test] extra) on top.
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# Not --quiet: a fresh install downloads torch for minutes, and pip's "Collecting"/"Downloading" lines show where it is.
PIP := $(BIN)/python -m pip install --disable-pip-version-check --progress-bar on
# The editable installs: without setuptools' "Editable installation" note (information only, printed even by pip -q).
PIP_EDITABLE := PYTHONWARNINGS="ignore:Editable installation" $(PIP)
CHECKOV := $(VENV)/tools-checkov/bin/checkov
# The TypeScript client's npm packages (tsc, ts-proto, grpc-js), exactly as package-lock.json pins them.
TS_DEPS := clients/typescript/node_modules

.PHONY: serve test lint protos clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@echo "==> $(VENV): the server and the client (torch==2.13.0 first: on a fresh machine a download of minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	# torch first and pinned: nothing later may pull another torch.
	$(PIP) torch==2.13.0
	$(PIP_EDITABLE) torch==2.13.0 -e clients/python -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) pyproject.toml
	@echo "==> $(VENV): the test tools (the [test] extra: captum, pytest, ruff, mypy, ...) and the client's [viz] extra (matplotlib)"
	$(PIP_EDITABLE) torch==2.13.0 -e "clients/python[viz]" -e ".[test]"
	touch $(TEST_STAMP)

serve: $(STAMP)
	$(BIN)/attrserve serve $(ARGS)

# ruff and mypy read their settings (and which files to check) from pyproject.toml.
lint: $(TEST_STAMP)
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy
	cd protos && ../$(BIN)/buf lint

# checkov in its own venv: its pins would downgrade the project's packages.
$(CHECKOV): deploy/tools/install-checkov.sh | $(STAMP)
	deploy/tools/install-checkov.sh $(PYTHON)

$(TS_DEPS): clients/typescript/package.json clients/typescript/package-lock.json
	@echo "==> $(TS_DEPS): npm ci (the TypeScript client's tests build it with tsc)"
	cd clients/typescript && npm ci --no-audit --no-fund
	touch $(TS_DEPS)

test: $(TEST_STAMP) lint $(CHECKOV) $(TS_DEPS)
	$(BIN)/python -m pytest -q $(ARGS)

# Both clients: the Python stubs (and the service's KServe ones), then clients/typescript/src/gen.
protos: $(TEST_STAMP) $(TS_DEPS)
	PATH=$(CURDIR)/$(BIN):$$PATH protos/generate.sh
	PYTHON=$(CURDIR)/$(BIN)/python clients/typescript/generate.sh

clean:
	rm -rf $(VENV)
