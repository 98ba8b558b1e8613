# kvmpy: `make run` runs the bundled hello guest, `make test` runs the whole suite.
# Both bootstrap .venv on first use (python3 -m venv; pip install -e '.[dev]').

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvmpy-installed

.PHONY: all run test lint format doctor bench clean deps fuzz

all: test

# Guests are built with gcc and binutils; install them when they are missing and we can.
deps:
	@command -v gcc >/dev/null && command -v objcopy >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing gcc and binutils"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc binutils libc6-dev; \
	  else \
	    echo "kvmpy needs gcc and binutils to build guests: install them (e.g. apt install gcc binutils)"; exit 1; \
	  fi; }

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

run: deps $(STAMP)
	$(BIN)/kvmpy run hello --stats

test: deps $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/pytest
	# The backend contract once more with /dev/kvm hidden: kvmpy works without KVM (unicorn).
	KVMPY_DEV=/nonexistent/kvm $(BIN)/pytest -q tests/test_contract.py

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP)
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

doctor: $(STAMP)
	$(BIN)/kvmpy doctor

# Every fuzz harness (fuzz/harnesses.py) for FUZZ_RUNS inputs each, coverage-guided under atheris,
# at low priority; a summary line per harness (inputs, crashes, time, peak RSS). `make test` runs
# a short smoke run of each (tests/test_fuzz_smoke.py).
FUZZ_RUNS ?= 1000000
FUZZ_HARNESSES ?= hypercalls pio snapshot migration control
fuzz: deps $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,fuzz]'
	@for h in $(FUZZ_HARNESSES); do \
	  nice -n 10 $(BIN)/python fuzz/run.py $$h --runs $(FUZZ_RUNS) || exit 1; done

bench: deps $(STAMP)
	$(BIN)/kvmpy bench exits

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache .hypothesis \
	  fuzz/corpus fuzz/crashes
