# make demo  : install (once) and run the offline demo
# make test  : install (once) and run the test suite (2 pytest-xdist workers)
# make lint  : ruff (check, format --check); installs only ruff, at the version pinned in pyproject.toml
# make arch  : print the architecture report
VENV  ?= .venv
PY    := $(VENV)/bin/python
RUFF  := $(VENV)/bin/ruff
# torch is installed first, and only where the venv has none: a bare `torch` requirement would pull a
# multi-GB CUDA build. On a GPU machine install your CUDA build into the venv first, or set TORCH.
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install demo test lint arch clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -qq -e ".[dev,cluster,experiments]"  # -qq: errors only, not setuptools' editable-install notice
	touch $@

demo: install
	$(PY) -m bksdm_lab.train experiment=demo

test: install
	$(PY) -m pytest -q -n 2

lint: $(RUFF)
	$(RUFF) check . && $(RUFF) format --check .

$(RUFF): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$$(grep -o 'ruff==[0-9.]*' pyproject.toml)"
	touch $@

arch: install
	$(PY) -m bksdm_lab.arch

clean:
	rm -rf outputs multirun .pytest_cache
