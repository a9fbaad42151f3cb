# Two commands do everything on a fresh machine:
#   make demo   set up, then fresh rollouts -> Draft-OPD from the shipped drafter -> evaluation on the embedded SmolLM2-135M
#   make test   set up, then the test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup demo test test-fast bench

setup:
	@$(PYTHON) scripts/bootstrap.py

demo: setup
	$(PYTHON) -m draftopd demo

test: setup
	$(PYTHON) -m pytest -q

test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow"

bench: setup
	$(PYTHON) benchmarks/decode_overhead.py
