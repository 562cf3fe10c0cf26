# make run: set up .venv (once) and run the default job on the built-in tiny model.
# make test: same set-up, then the whole test suite.
# make wheel-check: build the wheel, install it in a fresh venv, use it from an empty folder.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a plain `torch` requirement would pull a CUDA build of several GB.
# On a GPU machine: make TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: run test setup clean bench-gpu wheel-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench,sweep]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m onediffx run

test: $(STAMP)
	$(PY) -m pytest -q

wheel-check: $(STAMP)
	TORCH_SPEC="$(TORCH_SPEC)" .ci/wheel-check $(PY)

clean:
	rm -rf $(VENV) outputs
