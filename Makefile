# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# AUTO builds the CUDA kernels when nvcc and a CUDA build of torch are present; 0 forces CPU-only.
MOE_FRAMEWORK_CUDA ?= AUTO
export MOE_FRAMEWORK_CUDA
# The torch to install and build against: the CUDA 13 build by default (6.1 GB of venv with its
# CUDA libraries); TORCH=torch==2.13.0 takes the CPU-only wheel (1.7 GB; no CUDA kernels are built).
TORCH ?= torch==2.14.1
# One OpenMP thread pool of at most the machine's cores (never oversubscribe).
NPROC := $(shell nproc 2>/dev/null || echo 2)

.PHONY: venv install test demo bench lint format inplace docs clean

$(VENV)/.deps-stamp: requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install --no-cache-dir "$(TORCH)" -r requirements-ci.txt
	touch $@

venv: $(VENV)/.deps-stamp
	@$(PY) -c "import sys, importlib.metadata as m; want = '$(TORCH)'.partition('==')[2]; \
		have = m.version('torch'); sys.exit(0 if not want or have.split('+')[0] == want else \
		f'$(VENV) holds torch {have} but TORCH=$(TORCH): rm -rf $(VENV) build, then rerun')"

# --no-build-isolation: compile against the torch installed in the venv (an extension must match
# the exact torch it is loaded into; an isolated build would fetch another torch to build with).
install: venv
	@mkdir -p build
	CMAKE_BUILD_PARALLEL_LEVEL=$(NPROC) $(PY) -m pip install --no-build-isolation --no-deps -v . \
		> build/pip-install.log 2>&1 || (tail -60 build/pip-install.log; exit 1)
	@grep -E "moe_framework:|warning:|Successfully installed" build/pip-install.log || true
	cd / && $(abspath $(PY)) -c "import moe_framework; print('kernels:', moe_framework.ops.registered_kernels())"

# Runs the suite against the installed wheel (pytest from the venv does not put the source tree
# on sys.path, so the compiled extension under test is the installed one).
test: install
	cd tests && ../$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS) .

demo: install
	@# run outside the source tree so the installed package (with its compiled extension) is used
	cd / && $(abspath $(PY)) -m moe_framework demo --out $(CURDIR)/outputs/demo $(DEMO_ARGS)

# The suite ships inside the package (moe_framework/benchmarks); JSON lands in ./bench_results.
bench: install
	cd / && MOE_BENCH_RESULTS=$(CURDIR)/bench_results $(abspath $(PY)) -m moe_framework bench $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check moe_framework tests examples
	$(VENV)/bin/ruff format --check moe_framework tests examples
	$(VENV)/bin/mypy
	$(VENV)/bin/clang-format --dry-run --Werror csrc/*.cpp csrc/include/moe_framework/*.h $(wildcard csrc/cpu/*.cpp csrc/cpu/*/*.cpp csrc/cpu/*/*.h) $(wildcard csrc/cuda/*.cu) $(wildcard csrc/include/moe_framework/*.cuh) moe_framework/benchmarks/*.c

format: venv
	$(VENV)/bin/ruff format moe_framework tests examples
	$(VENV)/bin/ruff check --fix moe_framework tests examples
	$(VENV)/bin/clang-format -i csrc/*.cpp csrc/include/moe_framework/*.h $(wildcard csrc/cpu/*.cpp csrc/cpu/*/*.cpp csrc/cpu/*/*.h) $(wildcard csrc/cuda/*.cu) $(wildcard csrc/include/moe_framework/*.cuh) moe_framework/benchmarks/*.c

# Developer build into the source tree with the current python (no venv): `make inplace` then
# `python -m pytest tests`. Use MOE_FRAMEWORK_CUDA=0 for fast CPU-only iterations.
inplace:
	cmake -S . -B build/inplace-$(MOE_FRAMEWORK_CUDA) -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DPython_EXECUTABLE=$$(command -v $(PYTHON)) -DMOE_FRAMEWORK_CUDA=$(MOE_FRAMEWORK_CUDA) >/dev/null
	cmake --build build/inplace-$(MOE_FRAMEWORK_CUDA) -j $(NPROC)
	@# copy then rename: a process that has the old library loaded keeps its (unlinked) file
	for f in build/inplace-$(MOE_FRAMEWORK_CUDA)/_C*.so; do \
		cp $$f moe_framework/.$$(basename $$f).tmp && mv moe_framework/.$$(basename $$f).tmp moe_framework/$$(basename $$f); done

# API reference generated from the docstrings (pdoc) into build/api/index.html: every public module
# of the installed package (names without a leading underscore; the benchmark scripts left out).
docs: install
	cd / && $(abspath $(PY)) -m moe_framework.apidocs $(CURDIR)/build/api

clean:
	rm -rf build moe_framework/_C*.so
