# kvmpy: `make run` runs the bundled hello guest, `make test` runs the whole suite.
# Both bootstrap .venv on first use (python3 -m venv; pip install -e '.[dev]').

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvmpy-installed

.PHONY: all run test lint format doctor bench clean deps fuzz linux-kernel

all: test

# Guests are built with gcc and binutils; install them when they are missing and we can.
# e2fsprogs: the Linux tests make an ext4 image (mkfs.ext4 -d) and read it back (debugfs).
deps:
	@command -v gcc >/dev/null && command -v objcopy >/dev/null && command -v mkfs.ext4 >/dev/null \
	  && command -v debugfs >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing gcc, binutils and e2fsprogs"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc binutils libc6-dev e2fsprogs; \
	  else \
	    echo "kvmpy needs gcc, binutils and e2fsprogs: install them (e.g. apt install gcc binutils e2fsprogs)"; exit 1; \
	  fi; }
	@# The API dashboard's test drives Debian's Chromium (never a downloaded browser).
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium (for the dashboard test)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "the dashboard test needs chromium (apt install chromium); it is skipped without it"; \
	  fi; }

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

run: deps $(STAMP)
	$(BIN)/kvmpy run hello --stats

# The Linux tests (tests/test_linux.py) boot kvmpy's microVM kernel: built once from the
# distribution's linux-source (about 3 minutes on 2 cores, niced; apt-get installs the build
# packages when we are root) and cached under ~/.cache/kvmpy/kernels. A cached kernel of the
# current config makes this a no-op. The initramfs needs busybox-static (apt-get download, no
# root; a fresh container has no package lists yet, hence the update and retry).
linux-kernel: $(STAMP)
	$(BIN)/kvmpy kernel build
	@$(BIN)/kvmpy initramfs -o $(VENV)/initramfs.cpio 2>/dev/null || { \
	  [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
	  $(BIN)/kvmpy initramfs -o $(VENV)/initramfs.cpio; }

test: deps $(STAMP) linux-kernel
	$(BIN)/ruff check src tests
	$(BIN)/pytest
	# The backend contract once more with /dev/kvm hidden: kvmpy works without KVM (unicorn).
	# CI= : here the KVM half is meant to be skipped.
	KVMPY_DEV=/nonexistent/kvm CI= $(BIN)/pytest -q tests/test_contract.py

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
