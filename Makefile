# The two set-up commands of the README are `make demo` and `make test`; each installs what it needs first.
SHELL := /bin/bash
VENV = $(shell scripts/setup-venv.sh)

.PHONY: setup demo test test-fast lint fmt bench gpu-check-prepare gpu-check-quick gpu-check-reference lock clean

setup:
	@echo "venv: $(VENV)"

demo:  ## train on the embedded default, merge, export, validate; prints where the results are
	$(VENV)/bin/peftx demo

test:  ## the whole test suite (what CI runs); first the device Python stacks infer.py is run under (docs/device.md)
	scripts/setup-device-venvs.sh
	$(VENV)/bin/python -m pytest -q --durations=25

test-fast:  ## the inner loop: skip the slow tests (real weights, whole CLI runs, subprocess end-to-end)
	scripts/setup-device-venvs.sh
	$(VENV)/bin/python -m pytest -q -m "not slow"

lint:  ## ruff (lint + format check) and mypy (scripts/typecheck.sh: cli/ and exports/ as peftx.cli / peftx.exports)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	PYTHON=$(VENV)/bin/python scripts/typecheck.sh

fmt:  ## format, then apply ruff's safe fixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench:  ## benchmarks (minutes): inference, training, export; see README
	$(VENV)/bin/peftx bench

gpu-check-prepare:  ## before a GPU check: the fp16 demo weights it carries (gpu-check-assets/, gitignored)
	PYTHON=$(VENV)/bin/python bash scripts/gpu-check.sh --prepare

gpu-check-quick:  ## the GPU check's CPU mode: every step on tiny random models (what its test runs)
	PYTHON=$(VENV)/bin/python bash scripts/gpu-check.sh --device cpu --quick

gpu-check-reference:  ## re-record the CPU FP32 training reference the GPU check compares with (minutes)
	PYTHON=$(VENV)/bin/python bash scripts/gpu-check.sh --record-reference

lock:  ## regenerate requirements.lock from the current venv
	$(VENV)/bin/python -m pip freeze --all | grep -viE '^(-e|peftx|img.focus|pip==)' > requirements.lock

clean:
	rm -rf build dist *.egg-info .pytest_cache
