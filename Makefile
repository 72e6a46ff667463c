# Every target installs what it needs on a fresh machine: a virtual environment with the
# package and its extras, and the Debian packages that hold the offline datasets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.e2kd-installed

.PHONY: test test-fast demo install system-deps bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test,data]"
	touch $(STAMP)

install: $(STAMP) system-deps

system-deps:
	@bash scripts/install-system-deps.sh

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(VENV)/bin/e2kd demo

bench: install
	$(PY) -m benchmarks.step

clean:
	rm -rf $(VENV) .cache runs
