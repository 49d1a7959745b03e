# roomkeeper: `make demo` shows it working, `make test` proves it. Everything installs itself.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo run test test-fast check format migrate sandbox chaos bench clean

install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install     ## the whole system on embedded defaults, with sample meetings
	$(BIN)/roomkeeper demo

run: install      ## worker + beat + Flower + web on the configured settings
	$(BIN)/roomkeeper run

test: install     ## the whole suite, tier by tier: pure, store (SQLite, PostgreSQL, Redis), processes
	$(BIN)/pytest

test-fast: install  ## the pure tier: no I/O, in seconds
	$(BIN)/pytest tests/pure

check: install    ## lint and types
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

migrate: install
	$(BIN)/roomkeeper migrate

sandbox: install
	$(BIN)/roomkeeper sandbox

chaos: install    ## soak run under faults and kills (minutes; not in CI): ARGS=--quick
	$(BIN)/python -m bench.chaos $(ARGS)

bench: install    ## the benchmark: precision, naive recipe, intake, throughput, store, budget (not in CI)
	$(BIN)/python -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
