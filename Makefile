# make run: set up .venv (once) and run the default job on the built-in tiny model.
# make test: same set-up, then the whole test suite.
# make wheel-check: build the wheel, install it in a fresh venv, use it from an empty folder.
# make test-compat: a fast subset on the declared minimum versions, in a fresh venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch where a local wheel of it exists (this project's CI machines); a plain
# `torch` requirement would pull a CUDA build of several GB. Elsewhere without a GPU:
#   make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
# On a GPU machine: make TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: run test setup clean bench-gpu wheel-check test-compat

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "set-up: virtualenv $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@echo "set-up: $(TORCH_SPEC)"
	@$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	@$(PY) -c "import torch; gpu = torch.cuda.is_available(); build = 'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU'; \
	  print(f'set-up: torch {torch.__version__} ({build} build; GPU visible: {gpu})'); \
	  torch.version.cuda and not gpu and print('set-up: note: a CUDA build on a machine without a visible GPU; for the CPU build: make clean; make TORCH_SPEC=\"torch --index-url https://download.pytorch.org/whl/cpu\"')"
	@echo "set-up: onediffx (editable) with its test, bench, sweep, serve, quantize and ray extras"
	@$(PY) -m pip install -q --disable-pip-version-check -e ".[test,bench,sweep,serve,quantize,ray]"
	@touch $(STAMP)

run: $(STAMP)
	$(PY) -m onediffx run

# PYTEST_FLAGS="-n auto --dist loadfile": a worker per core, each test file on one worker (its
# module-scoped compiled fixtures are built once): 19 minutes on two cores, against 31 in one process.
# CI stays in one process until parallel runs have a record of passing (two races found so far, fixed).
PYTEST_FLAGS ?=
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_FLAGS)

wheel-check: $(STAMP)
	TORCH_SPEC="$(TORCH_SPEC)" .ci/wheel-check $(PY)

test-compat:
	TORCH_SPEC="$(TORCH_SPEC)" .ci/compat-check $(PYTHON)

clean:
	rm -rf $(VENV) outputs
