# The two commands: `make run` and `make test`. Each creates .venv when absent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test unit lint install clean

$(BIN)/everlearn: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@# torch first: 2.13.0 is the CPU build on disk; letting the resolver choose pulls CUDA.
	$(BIN)/pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	@touch $(BIN)/everlearn

install: $(BIN)/everlearn

run: install
	$(BIN)/everlearn run $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest -m unit -q

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
