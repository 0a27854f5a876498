# make demo   set everything up (once) and run the demo
# make test   set everything up (once) and run the test suite
# make bench  the kernel benchmarks (benchmarks/bench_ops.py), written under build/bench
#             (make bench BENCH_OUT=benchmarks/results refreshes the tracked results)
# Set-up is idempotent: the venv, the requirements and the extension are redone only when their inputs change.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
# ccache makes rebuilds of unchanged sources take seconds, when it is installed.
CCACHE_CXX := $(wildcard /usr/lib/ccache/g++)
ifneq ($(CCACHE_CXX),)
ifeq ($(origin CXX),default)
export CXX := $(CCACHE_CXX)
endif
endif
export CCACHE_NOHASHDIR := 1
export MAX_JOBS ?= 2

SOURCES := $(shell find csrc -type f) setup.py

.PHONY: setup demo test bench clean
setup: $(VENV)/.built

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: requirements.txt | $(PY)
	$(PY) -m pip install --upgrade pip "setuptools>=64" wheel
	$(PY) -m pip install -r requirements.txt
	touch $@

# The package with its optional dependencies, which the tests need: deploy (onnx, onnxruntime, onnxscript), plot
# (matplotlib: every chart), timm (timm backbones), plug (smp, transformers: other libraries' models with CSFLM) and
# dev (import-linter, ruff, clang-format: the checks of .ci/run); install_requires are already there from the
# requirements, so pip only adds the extras.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --no-build-isolation -e ".[deploy,plot,timm,plug,dev]"
	touch $@

demo: setup
	$(VENV)/bin/csfrn demo --out demo_out

# The tests run one torch thread each: TEST_WORKERS processes (pytest-xdist) share the cores.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

BENCH_OUT ?= build/bench
bench: setup
	$(PY) benchmarks/bench_ops.py --out $(BENCH_OUT)

clean:
	rm -rf build csfrn/*.so $(VENV)/.built
