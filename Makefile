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

.PHONY: run test setup clean bench-gpu test-gpu wheel-check test-compat

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

# make bench-gpu: the headline scenarios (diffusers eager, diffusers' documented torch.compile recipe,
# onediffx; then onediffx's restart from its graph cache) in one process on a GPU machine, filed as
# benchmarks/results/<date>-<card>/sdxl-headline.json with the commit, time, card and versions. The
# GPU must be the bench's alone: a record timed beside another process is written as not headline and
# the target fails. Then fill the README's table from it: python benchmarks/scripts/readme_table.py FILE
# make test-gpu: the tests marked gpu, with a junit record in the same folder.
# On a GPU machine: make TORCH_SPEC=torch bench-gpu; with a ready Python instead of .venv: PY=python3.
RESULTS := benchmarks/results
HEADLINE ?= model=sdxl model.synthetic=true 'bench.scenarios=[quantize,cold_start]' 'bench.quantize_modes=[]' \
	bench.cold_start_peers=false bench.headline=true bench.record_name=sdxl-headline bench.record_dir=$(RESULTS)
NEEDS_SETUP := $(if $(filter command line environment,$(origin PY)),,$(STAMP))

bench-gpu: $(NEEDS_SETUP)
	$(PY) -m onediffx bench $(HEADLINE)

test-gpu: $(NEEDS_SETUP)
	$(PY) -m pytest -q -m gpu $(PYTEST_FLAGS) --junitxml=$$($(PY) -m onediffx.bench.record $(RESULTS))/gpu-tests.xml

wheel-check: $(STAMP)
	TORCH_SPEC="$(TORCH_SPEC)" .ci/wheel-check $(PY)

test-compat:
	TORCH_SPEC="$(TORCH_SPEC)" .ci/compat-check $(PYTHON)

clean:
	rm -rf $(VENV) outputs
