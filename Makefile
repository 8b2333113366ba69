# Two commands do everything on a fresh machine:
#   make classify INPUT=dir/ [OUTPUT=out/] [WEIGHTS=imagenet|random|file] [ARGS="--batch-size 512 ..."]
#   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUTPUT ?= output
WEIGHTS ?= imagenet
ARGS ?=

.PHONY: help install classify test test-fast lint bench bench-cpu bench-s3 soak clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv and install the package with its dev tools

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# exec: make's child is Python itself, so a SIGTERM to make (which make passes to its child) reaches Python,
# and make waits for its clean stop; without it the shell dies and Python runs on, orphaned. make itself exits 2
# whenever a recipe fails (its "Error N" line shows Python's code): schedulers call .venv/bin/pipeline directly.
classify: install  ## classify INPUT=dir/ into OUTPUT (default ./output)
	@test -n "$(INPUT)" || { echo "usage: make classify INPUT=dir/ [OUTPUT=out/] [WEIGHTS=...] [ARGS=...]" >&2; exit 2; }
	exec $(PY) -m pipeline classify "$(INPUT)" "$(OUTPUT)" --weights "$(WEIGHTS)" $(ARGS)

test: install  ## the whole test suite (what CI runs)
	$(PY) -m pytest

test-fast: install  ## the tests not marked slow
	$(PY) -m pytest -m "not slow"

lint: install  ## ruff
	$(PY) -m ruff check pipeline tests scripts

bench: install  ## GPU benchmark (needs CUDA, scikit-image or scikit-learn): corpus, job, baselines, table last
	$(PY) scripts/bench.py $(ARGS)

bench-cpu: install  ## the whole job against the bare model's forward throughput on this CPU
	$(PY) scripts/bench_cpu.py $(ARGS)

bench-s3: install  ## images/s from a local S3 API server with 0 and 30 ms added per request (docs/benchmarks.md)
	$(PY) scripts/bench_s3.py $(ARGS)

soak: install  ## SIGKILL real runs 100 times, resume each, write the figures into docs/reliability.md
	$(PY) scripts/soak.py --kills 100

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
