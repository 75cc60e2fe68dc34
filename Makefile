# The two set-up commands of the README are `make demo` and `make test`; each installs what it needs first.
SHELL := /bin/bash
VENV = $(shell scripts/setup-venv.sh)

.PHONY: setup demo test test-fast bench lock clean

setup:
	@echo "venv: $(VENV)"

demo:  ## train on the embedded default, merge, export, validate; prints where the results are
	$(VENV)/bin/peftx demo

test:  ## the whole test suite (what CI runs)
	$(VENV)/bin/python -m pytest -q

test-fast:  ## skip the real-weight tests
	$(VENV)/bin/python -m pytest -q -m "not slow"

bench:  ## benchmarks (minutes): inference, training, export; see README
	$(VENV)/bin/peftx bench

lock:  ## regenerate requirements.lock from the current venv
	$(VENV)/bin/python -m pip freeze --all | grep -viE '^(-e|peftx|img.focus|pip==)' > requirements.lock

clean:
	rm -rf build dist *.egg-info .pytest_cache
