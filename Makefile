# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install, run the main job
#   make test   create .venv, install, run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test venv clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch (a pinned version keeps pip off the multi-GB CUDA build);
	# pyproject.toml keeps a range for users
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q triton==3.6.0 -e ".[test,plot]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m sparsedsl.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info
