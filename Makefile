# TENGraD — build, test, demo, benchmark. `make help` lists the targets.
# `make demo` and `make test` each install what a fresh Debian machine lacks (see `setup`).

SHELL        := /bin/bash
# Absolute paths in commands are '$(CURDIR)/...', quoted: a checkout path may contain spaces,
# which $(abspath) would split into words. Relative paths everywhere else.
CC           ?= cc
CXX          ?= c++
BUILD        := build
# BLAS (docs/DESIGN.md §14): `scipy-openblas` (default) links PyPI's scipy-openblas32, a current
# OpenBLAS with every kernel set and runtime dispatch; `system` links the distribution's
# libopenblas-dev + liblapacke-dev (Debian 12's 0.3.21 runs generic SSE3 kernels on CPUs newer
# than it, e.g. Intel family 6 model 207). Each has its own build directory.
BLAS         ?= scipy-openblas
SCIPY_OPENBLAS := scipy-openblas32==0.3.34.481.3
ifeq ($(BLAS),scipy-openblas)
SCRATCH      := .build
INSTALL_BUILD := .build-install
# Evaluated when used (after `setup` installed the package), not when the Makefile is read.
SCIPY_OPENBLAS_DIR = $(shell $(PYTHON) -c 'import os, scipy_openblas32 as s; print(os.path.dirname(s.__file__))')
SWIFT_BLAS_PATHS = -Xcc -I$(SCIPY_OPENBLAS_DIR)/include -Xlinker -L$(SCIPY_OPENBLAS_DIR)/lib
SWIFT_BLAS   = --disable-default-traits --traits ScipyOpenBLAS $(SWIFT_BLAS_PATHS)
SWIFT_BLAS_RPATH = -Xlinker -rpath -Xlinker $(SCIPY_OPENBLAS_DIR)/lib
# The installed library finds it beside itself (make install copies it to lib/tengrad/) or, in
# the Python wheel, in the scipy_openblas32 package next to the tengrad package.
INSTALL_RPATH = -Xlinker -rpath -Xlinker '$$ORIGIN/tengrad:$$ORIGIN/../scipy_openblas32/lib'
PC_LIBS_PRIVATE := -lm
else ifeq ($(BLAS),system)
SCRATCH      := .build-system
INSTALL_BUILD := .build-install-system
SWIFT_BLAS_PATHS :=
SWIFT_BLAS   :=
SWIFT_BLAS_RPATH :=
INSTALL_RPATH :=
PC_LIBS_PRIVATE := -lopenblas -llapacke -lm
else
$(error BLAS must be scipy-openblas or system, not '$(BLAS)')
endif
SWIFT_FLAGS  = --scratch-path $(SCRATCH) $(SWIFT_BLAS) $(SWIFT_BLAS_RPATH)
RELEASE_DIR  := $(SCRATCH)/release
LIB          := $(RELEASE_DIR)/libtengrad.so
DATA_SRC     := /usr/share/datasets/fashion-mnist
DATA         := $(BUILD)/data
PYTHON       ?= python3
CWARN        := -Wall -Wextra -Werror
LINK_TENGRAD := -L$(RELEASE_DIR) -ltengrad -Wl,-rpath,'$(CURDIR)/$(RELEASE_DIR)'
APT_PACKAGES := libopenblas-dev liblapacke-dev dataset-fashion-mnist openmpi-bin libopenmpi-dev cmake pkg-config
PIP_PACKAGES := numpy pytest xxhash matplotlib tqdm asdfghjkl==0.1a5 heavyball==3.2.1 schedulefree==1.4.1 $(SCIPY_OPENBLAS)
TORCH        := torch==2.13.0+cpu
export OPENBLAS_NUM_THREADS ?= 2
# The Python binding, examples and benchmarks load the library this BLAS setting built.
export TENGRAD_LIBRARY := $(CURDIR)/$(RELEASE_DIR)/libtengrad.so

# The one version number lives in include/tengrad.h (TENGRAD_VERSION_MAJOR/MINOR/PATCH).
VERSION      := $(shell sed -n 's/^\#define TENGRAD_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\).*/\2/p' include/tengrad.h | paste -sd.)
MAJOR        := $(firstword $(subst ., ,$(VERSION)))
MINOR        := $(word 2,$(subst ., ,$(VERSION)))
# The ABI version in the SONAME: the major version, or major.minor while it is 0 (0.x minors may
# change the ABI: 0.5 added `size` to tengrad_conv2d_shape and tengrad_layer_stats).
ABI          := $(if $(filter 0,$(MAJOR)),$(MAJOR).$(MINOR),$(MAJOR))
PREFIX       ?= /usr/local
INSTALL_BUILD := .build-install

ASAN_CC      ?= clang
SAN_FLAGS    := -g -O1 -fsanitize=address,undefined -fno-sanitize-recover=undefined -fuse-ld=bfd
ASAN_DIR     := .build-asan/debug
FUZZ_DIR     := .build-fuzz/debug
FUZZ_SECONDS ?= 60
FUZZ_SWIFT   := -Xswiftc -sanitize=address -Xswiftc -sanitize-coverage=edge,inline-8bit-counters,pc-table,trace-cmp
# Swift's own crash backtracer would mask the sanitizer's report.
export SWIFT_BACKTRACE := enable=no

.PHONY: test-blas-system print-blas-flags install test-install test-wheel test-swiftpm demo-c demo-vit demo-distributed demo-mpi test-mpi help setup build test test-swift test-c test-python test-example test-asan fuzz fuzz-smoke fuzz-build demo bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: ## Install the apt and pip packages a fresh machine lacks (no-op when present)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@# One pip call with the torch pin: asdfghjkl requires an unpinned torch (a 2.8 GB CUDA build).
	@$(PYTHON) -c "import numpy, pytest, xxhash, matplotlib, tqdm, asdl, heavyball, schedulefree, torch, scipy_openblas32" 2>/dev/null || \
	  $(PYTHON) -m pip install -q $(PIP_PACKAGES) "$(TORCH)"

build: setup ## Build libtengrad.so and the Swift products (release)
	@# SwiftPM does not track the header behind the CTENGraDHeader module map: after a header
	@# change, make it recompile the thunks (which use the header's types and version macros).
	@if [ -f $(LIB) ] && [ include/tengrad.h -nt $(LIB) ]; then touch Sources/CTENGraD/*.swift; fi
	swift build -c release $(SWIFT_FLAGS)

$(DATA)/.done: | setup
	mkdir -p $(DATA)
	for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do \
	  gzip -dc $(DATA_SRC)/$$f.gz > $(DATA)/$$f; done
	touch $@

MLP_SOURCES  := examples/c/mlp_common.c examples/c/mlp_common.h include/tengrad.h
# Open MPI refuses root without these; one BLAS thread per rank (2 ranks on 2 cores).
MPIRUN       := timeout 300 mpirun --allow-run-as-root --oversubscribe -x OPENBLAS_NUM_THREADS=1 -x SWIFT_BACKTRACE

$(BUILD)/mlp: examples/c/mlp.c $(MLP_SOURCES) build
	mkdir -p $(BUILD)
	$(CC) -std=c11 -O2 $(CWARN) -Iinclude examples/c/mlp.c examples/c/mlp_common.c -o $@ $(LINK_TENGRAD) -lopenblas -lm
	$(CXX) -std=c++17 -O2 $(CWARN) -Iinclude -x c++ examples/c/mlp.c -x c++ examples/c/mlp_common.c -o $(BUILD)/mlp-cxx \
	  $(LINK_TENGRAD) -lopenblas -lm

# The MPI trainer: mpicc adds MPI; the library itself does not link it (checked in test-mpi).
$(BUILD)/mlp_mpi: examples/c/mlp_mpi.c $(MLP_SOURCES) build
	mkdir -p $(BUILD)
	mpicc -std=c11 -O2 $(CWARN) -Iinclude examples/c/mlp_mpi.c examples/c/mlp_common.c -o $@ $(LINK_TENGRAD) -lopenblas -lm

demo: build ## Main job: the Fashion-MNIST ConvNet race, TENGraD vs SGD, AdamW, Muon, SOAP, Schedule-Free, KFAC (~14 min)
	$(PYTHON) examples/torch/fashion_mnist.py --data $(DATA_SRC) --plot $(BUILD)/fashion_mnist.png $(DEMO_ARGS)

demo-c: $(BUILD)/mlp $(DATA)/.done ## The C trainer: 784-128-10 MLP on Fashion-MNIST, TENGraD vs SGD
	$(BUILD)/mlp --data $(DATA)

demo-vit: build ## A small ViT on Fashion-MNIST: TENGraD (exact blocks on the hidden layers) against the race's six peers (~16 min)
	$(PYTHON) examples/torch/vit.py --data $(DATA_SRC) --plot $(BUILD)/vit.png $(DEMO_ARGS)

demo-distributed: build ## The demo data-parallel on 2 processes (torchrun, gloo): TENGraD vs SGD vs Adam
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=2 examples/torch/fashion_mnist.py --distributed \
	  --data $(DATA_SRC) --optimizers tengrad,sgd,adam $(DEMO_ARGS)

demo-mpi: $(BUILD)/mlp_mpi $(DATA)/.done ## The C trainer data-parallel on 2 MPI ranks (exact global-batch blocks)
	$(MPIRUN) -np 2 $(BUILD)/mlp_mpi --data $(DATA) --epochs 3 --verify 3

test: test-swift test-c test-python test-example test-mpi test-install test-asan fuzz-smoke test-blas-system ## Run every test suite (what CI runs)

print-blas-flags: setup ## The swift build -X flags that link scipy-openblas32 (for a SwiftPM consumer; see README)
	@echo $(SWIFT_BLAS_PATHS) $(SWIFT_BLAS_RPATH)

# The numerics must not depend on the BLAS: the oracle suites again on the other build.
NUMPY_TESTS  := tests/test_linear.py tests/test_conv.py tests/test_sequence.py tests/test_state.py tests/test_errors.py \
                tests/test_blas.py
test-blas-system: ## The Swift, C ABI and numpy oracle suites against the system OpenBLAS build (BLAS=system)
	$(MAKE) --no-print-directory BLAS=system test-swift test-c
	cd bindings/python && TENGRAD_LIBRARY='$(CURDIR)/.build-system/release/libtengrad.so' \
	  $(PYTHON) -m pytest -q $(NUMPY_TESTS)

# One test at a time: OpenBLAS's thread count is process-wide, and tests that set it (handles with
# their own count) would change the kernels, and so the last bits, of tests running beside them.
test-swift: setup ## Swift tests of the core against the dense float64 oracle
	swift test --no-parallel $(SWIFT_FLAGS)

test-c: build ## C ABI tests, compiled as C11 and C++17 with warnings as errors
	mkdir -p $(BUILD)
	$(CC) -std=c11 -O1 $(CWARN) -Iinclude Tests/c/test_abi.c -o $(BUILD)/test_abi $(LINK_TENGRAD) -lm
	$(CXX) -std=c++17 -O1 $(CWARN) -Iinclude -x c++ Tests/c/test_abi.c -o $(BUILD)/test_abi_cxx $(LINK_TENGRAD) -lm
	$(CC) -std=c11 -O1 $(CWARN) -Iinclude Tests/c/test_threads.c -o $(BUILD)/test_threads $(LINK_TENGRAD) -lpthread
	$(CC) -std=c11 -O1 $(CWARN) -Iinclude Tests/c/test_batch_api.c -o $(BUILD)/test_batch_api $(LINK_TENGRAD) -lm
	$(CXX) -std=c++17 -O1 $(CWARN) -Iinclude -x c++ Tests/c/test_batch_api.c -o $(BUILD)/test_batch_api_cxx $(LINK_TENGRAD) -lm
	$(CC) -std=c11 -O1 $(CWARN) -Iinclude Tests/c/test_layer_kinds.c -o $(BUILD)/test_layer_kinds $(LINK_TENGRAD) -lm
	$(CXX) -std=c++17 -O1 $(CWARN) -Iinclude -x c++ Tests/c/test_layer_kinds.c -o $(BUILD)/test_layer_kinds_cxx $(LINK_TENGRAD) -lm
	$(CC) -std=c11 -O1 $(CWARN) -Iinclude Tests/c/test_base.c -o $(BUILD)/test_base $(LINK_TENGRAD) -lm
	$(CXX) -std=c++17 -O1 $(CWARN) -Iinclude -x c++ Tests/c/test_base.c -o $(BUILD)/test_base_cxx $(LINK_TENGRAD) -lm
	$(BUILD)/test_abi
	$(BUILD)/test_abi_cxx
	$(BUILD)/test_threads
	$(BUILD)/test_batch_api
	$(BUILD)/test_batch_api_cxx
	$(BUILD)/test_layer_kinds
	$(BUILD)/test_layer_kinds_cxx
	$(BUILD)/test_base
	$(BUILD)/test_base_cxx

test-python: build ## pytest of the Python binding
	cd bindings/python && $(PYTHON) -m pytest -q tests

test-example: $(BUILD)/mlp $(DATA)/.done ## The examples on real data; the C trainer checks that TENGraD lowers the loss
	$(BUILD)/mlp --data $(DATA) --epochs 1 --train-limit 6000 --test-limit 2000 --check
	$(BUILD)/mlp-cxx --data $(DATA) --epochs 1 --train-limit 6000 --test-limit 2000 --fisher empirical --check
	$(PYTHON) examples/python/numpy_mlp.py --epochs 1 --train-limit 3000
	$(PYTHON) examples/python/numpy_conv.py --epochs 1 --train-limit 2000
	@# Numbers are parsed strictly: out of range, NaN or trailing text is a usage error (status 2).
	@for bad in "--epochs 99999999999" "--lr-ng nan" "--batch 12x" "--damping -1"; do \
	  $(BUILD)/mlp --data $(DATA) $$bad 2>/dev/null; rc=$$?; \
	  test $$rc = 2 || { echo "mlp $$bad: status $$rc, expected 2"; exit 1; }; done
	$(PYTHON) examples/torch/fashion_mnist.py --budget 3 --train-limit 3000 --test-limit 1000 --eval-seconds 1 \
	  --no-paired-cost --plot $(BUILD)/fashion_mnist_smoke.png
	$(PYTHON) examples/torch/vit.py --budget 3 --train-limit 3000 --test-limit 1000 --eval-seconds 1.5 \
	  --no-paired-cost --plot $(BUILD)/vit_smoke.png
	$(PYTHON) examples/torch/ablation.py --budget 2 --train-limit 2000 --test-limit 500 --eval-seconds 1 \
	  --plot $(BUILD)/ablation_smoke.png
	$(PYTHON) examples/torch/tune.py --budget 0.3 --train-limit 500 --test-limit 200 --optimizers sgd,tengrad-hidden \
	  --out $(BUILD)/TUNING_smoke.md
	grep -q "^\* \*\*sgd\*\*" $(BUILD)/TUNING_smoke.md && grep -q "^\* \*\*tengrad-hidden\*\*" $(BUILD)/TUNING_smoke.md
	$(PYTHON) examples/torch/untuned.py --steps 4 --lrs 0.1 --options "" --options "update_freq=2,kl_clip=0.01,lr=sgd"
	timeout 300 $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=2 examples/torch/fashion_mnist.py \
	  --distributed --budget 3 --train-limit 3000 --test-limit 1000 --eval-seconds 1.5 --optimizers tengrad,adam \
	  --tengrad-base adam --window 2
	swift build -c release --product tengrad-swift-example $(SWIFT_FLAGS)
	$(RELEASE_DIR)/tengrad-swift-example $(DATA) 1

test-mpi: $(BUILD)/mlp_mpi $(DATA)/.done ## MPI trainer: P = 2, 3 equal one process, lower the loss; a failing rank stops all
	@if readelf -d $(LIB) | grep -i 'NEEDED.*mpi'; then echo "libtengrad.so must not link MPI"; exit 1; fi
	$(MPIRUN) -np 2 $(BUILD)/mlp_mpi --data $(DATA) --train-limit 6000 --test-limit 1000 --update-freq 2 --verify 6 --check
	$(MPIRUN) -np 3 $(BUILD)/mlp_mpi --data $(DATA) --train-limit 6000 --test-limit 1000 --batch 100 \
	  --fisher empirical --verify 4 --check
	@# A NaN gradient on the last rank at step 3: every rank must stop (status 1) and say so.
	@if $(MPIRUN) -np 2 $(BUILD)/mlp_mpi --data $(DATA) --train-limit 6000 --test-limit 1000 --fail-at 3 \
	    > $(BUILD)/mpi_fail.log 2>&1; then echo "the failing run did not fail"; exit 1; fi
	@test "$$(grep -c 'step 3 failed on 1 rank' $(BUILD)/mpi_fail.log)" = 2 || \
	  { cat $(BUILD)/mpi_fail.log; echo "not every rank stopped at step 3"; exit 1; }
	@echo "MPI failure test: both ranks stopped at step 3"
	@for bad in "--update-freq 99999999999" "--lr nan" "--verify 3.5"; do \
	  $(MPIRUN) -np 2 $(BUILD)/mlp_mpi --data $(DATA) $$bad >/dev/null 2>&1; rc=$$?; \
	  test $$rc != 0 || { echo "mlp_mpi $$bad was accepted"; exit 1; }; done

# The installed library: the Swift standard library linked in statically (no Swift runtime
# needed at run time), only the C ABI exported, SONAME libtengrad.so.ABI.
$(INSTALL_BUILD)/release/libtengrad.so: $(shell find Sources include -type f) install/tengrad.map
	@if [ -f $@ ] && [ include/tengrad.h -nt $@ ]; then touch Sources/CTENGraD/*.swift; fi
	swift build -c release --product tengrad --scratch-path $(INSTALL_BUILD) $(SWIFT_BLAS) $(INSTALL_RPATH) -Xswiftc -static-stdlib \
	  -Xlinker -soname -Xlinker libtengrad.so.$(ABI) -Xlinker --version-script -Xlinker '$(CURDIR)/install/tengrad.map'

install: $(INSTALL_BUILD)/release/libtengrad.so ## Install header, library, pkg-config and CMake files (PREFIX=/usr/local, DESTDIR)
	install -d $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/lib/cmake/TENGraD
	install -m 644 include/tengrad.h $(DESTDIR)$(PREFIX)/include/tengrad.h
	install -m 755 $< $(DESTDIR)$(PREFIX)/lib/libtengrad.so.$(VERSION)
	ln -sf libtengrad.so.$(VERSION) $(DESTDIR)$(PREFIX)/lib/libtengrad.so.$(ABI)
	ln -sf libtengrad.so.$(ABI) $(DESTDIR)$(PREFIX)/lib/libtengrad.so
ifeq ($(BLAS),scipy-openblas)
	@# The library's private BLAS (found through its rpath $$ORIGIN/tengrad), with its licence.
	install -d $(DESTDIR)$(PREFIX)/lib/tengrad
	install -m 755 $(SCIPY_OPENBLAS_DIR)/lib/libscipy_openblas.so $(DESTDIR)$(PREFIX)/lib/tengrad/
	install -m 644 $$($(PYTHON) -c "import importlib.metadata as m; \
	  print(next(f.locate() for f in m.files('scipy-openblas32') if f.name.startswith('LICENSE')))") \
	  $(DESTDIR)$(PREFIX)/lib/tengrad/LICENSE.scipy-openblas32.txt
endif
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(VERSION)|' -e 's|@LIBS_PRIVATE@|$(PC_LIBS_PRIVATE)|' \
	  install/tengrad.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/tengrad.pc
	for f in TENGraDConfig TENGraDConfigVersion; do \
	  sed -e 's|@VERSION@|$(VERSION)|' -e 's|@ABI@|$(ABI)|' install/$$f.cmake.in > $(DESTDIR)$(PREFIX)/lib/cmake/TENGraD/$$f.cmake; done

test-install: setup test-wheel test-swiftpm ## Install into a temporary prefix; build and run a pkg-config C consumer and a CMake C++ consumer
	@set -e; prefix=$$(mktemp -d); stage=$$(mktemp -d); \
	$(MAKE) --no-print-directory install PREFIX=$$prefix; \
	$(MAKE) --no-print-directory install PREFIX=/opt/tengrad DESTDIR=$$stage >/dev/null; \
	test -f $$stage/opt/tengrad/lib/libtengrad.so.$(VERSION) && test -f $$stage/opt/tengrad/lib/pkgconfig/tengrad.pc; \
	lib=$$prefix/lib/libtengrad.so.$(VERSION); \
	test "$$(readelf -d $$lib | sed -n 's/.*SONAME.*\[\(.*\)\]/\1/p')" = libtengrad.so.$(ABI); \
	! readelf -d $$lib | grep -q 'NEEDED.*swift' || { echo "installed library needs the Swift runtime"; exit 1; }; \
	exported=$$(nm -D --defined-only $$lib | awk '$$2 == "T" {print $$3}' | sort); \
	declared=$$(grep -o '\btengrad_[a-z0-9_]*(' include/tengrad.h | tr -d '(' | sort -u); \
	test "$$exported" = "$$declared" || { echo "exports differ from the header:"; diff <(echo "$$exported") <(echo "$$declared"); exit 1; }; \
	test "$$(PKG_CONFIG_PATH=$$prefix/lib/pkgconfig pkg-config --modversion tengrad)" = $(VERSION); \
	$(CC) -std=c11 $(CWARN) Tests/install/consumer.c -o $$prefix/consumer-c \
	  $$(PKG_CONFIG_PATH=$$prefix/lib/pkgconfig pkg-config --cflags --libs tengrad) -lm; \
	env -u LD_LIBRARY_PATH $$prefix/consumer-c $(if $(filter scipy-openblas,$(BLAS)),scipy-openblas32); \
	cmake -S Tests/install/cmake -B $$prefix/cmake-build -DCMAKE_PREFIX_PATH=$$prefix -DEXPECTED_VERSION=$(VERSION) >/dev/null; \
	cmake --build $$prefix/cmake-build >/dev/null; \
	env -u LD_LIBRARY_PATH $$prefix/cmake-build/consumer; \
	rm -rf $$prefix $$stage; echo "install test passed (version $(VERSION), SONAME libtengrad.so.$(ABI))"

test-wheel: setup ## pip install the package into a fresh venv; import it from elsewhere; the wheel bundles the library
	@set -e; tmp=$$(mktemp -d); \
	$(PYTHON) -m venv $$tmp/venv; \
	$$tmp/venv/bin/pip install -q ./bindings/python; \
	cd $$tmp && env -u TENGRAD_LIBRARY -u PYTHONPATH $$tmp/venv/bin/python '$(CURDIR)/Tests/install/wheel_check.py'; \
	cd '$(CURDIR)' && $$tmp/venv/bin/pip wheel -q --no-deps ./bindings/python -w $$tmp/wheels; \
	wheel=$$(ls $$tmp/wheels/*.whl); echo "built $$(basename $$wheel)"; \
	case "$$(basename $$wheel)" in *-none-any.whl) echo "the wheel claims to be pure Python"; exit 1;; esac; \
	$(PYTHON) -c "import sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist(); \
	  assert 'tengrad/libtengrad.so' in names, names" $$wheel; \
	rm -rf $$tmp; echo "wheel test passed"

test-swiftpm: setup ## A package outside the checkout depends on it by path, imports TENGraD, builds and runs
	@# Default traits (the system OpenBLAS), then the ScipyOpenBLAS trait with print-blas-flags' flags.
	@set -e; for blas in system scipy-openblas32; do \
	  tmp=$$(mktemp -d); cp -r Tests/install/swiftpm/Sources $$tmp/; \
	  if [ $$blas = system ]; then traits=""; flags=""; \
	  else traits=', traits: ["ScipyOpenBLAS"]'; flags="$$($(MAKE) -s --no-print-directory BLAS=scipy-openblas print-blas-flags)"; fi; \
	  sed -e 's|@REPO@|$(CURDIR)|' -e "s|@IDENTITY@|$$(basename '$(CURDIR)' | tr A-Z a-z)|" -e "s|@TRAITS@|$$traits|" \
	    Tests/install/swiftpm/Package.swift.in > $$tmp/Package.swift; \
	  swift build --package-path $$tmp -c release $$flags 2>&1 | tail -1; \
	  $$tmp/.build/release/Consumer | tee $$tmp/out; grep -q "BLAS build $$blas," $$tmp/out; rm -rf $$tmp; \
	done

test-asan: setup ## Swift and C tests under AddressSanitizer (+ UBSan and LeakSanitizer for C)
	swift build --sanitize=address --scratch-path .build-asan --product tengrad $(SWIFT_BLAS) $(SWIFT_BLAS_RPATH)
	# --no-parallel, as test-swift: suites share process-wide state (OpenBLAS's thread count, the
	# fused kernels' size threshold the tests lower), so suites running at once see each other's.
	LSAN_OPTIONS=suppressions='$(CURDIR)/Tests/sanitizers/lsan.supp' swift test --no-parallel --sanitize=address --scratch-path .build-asan \
	  $(SWIFT_BLAS) $(SWIFT_BLAS_RPATH)
	mkdir -p $(BUILD)/asan
	$(ASAN_CC) -std=c11 $(SAN_FLAGS) $(CWARN) -Iinclude Tests/c/test_abi.c -o $(BUILD)/asan/test_abi \
	  -L$(ASAN_DIR) -ltengrad -Wl,-rpath,'$(CURDIR)/$(ASAN_DIR)' -lm
	$(ASAN_CC) -std=c11 $(SAN_FLAGS) $(CWARN) -Iinclude Tests/c/test_threads.c -o $(BUILD)/asan/test_threads \
	  -L$(ASAN_DIR) -ltengrad -Wl,-rpath,'$(CURDIR)/$(ASAN_DIR)' -lpthread
	$(ASAN_CC) -std=c11 $(SAN_FLAGS) $(CWARN) -Iinclude Tests/c/leak_loop.c -o $(BUILD)/asan/leak_loop \
	  -L$(ASAN_DIR) -ltengrad -Wl,-rpath,'$(CURDIR)/$(ASAN_DIR)' -lm
	$(ASAN_CC) -std=c11 $(SAN_FLAGS) $(CWARN) -Iinclude Tests/c/test_batch_api.c -o $(BUILD)/asan/test_batch_api \
	  -L$(ASAN_DIR) -ltengrad -Wl,-rpath,'$(CURDIR)/$(ASAN_DIR)' -lm
	$(ASAN_CC) -std=c11 $(SAN_FLAGS) $(CWARN) -Iinclude Tests/c/test_layer_kinds.c -o $(BUILD)/asan/test_layer_kinds \
	  -L$(ASAN_DIR) -ltengrad -Wl,-rpath,'$(CURDIR)/$(ASAN_DIR)' -lm
	$(ASAN_CC) -std=c11 $(SAN_FLAGS) $(CWARN) -Iinclude Tests/c/test_base.c -o $(BUILD)/asan/test_base \
	  -L$(ASAN_DIR) -ltengrad -Wl,-rpath,'$(CURDIR)/$(ASAN_DIR)' -lm
	ASAN_OPTIONS=detect_leaks=1 $(BUILD)/asan/test_abi
	ASAN_OPTIONS=detect_leaks=1 $(BUILD)/asan/test_batch_api
	ASAN_OPTIONS=detect_leaks=1 $(BUILD)/asan/test_layer_kinds
	ASAN_OPTIONS=detect_leaks=1 $(BUILD)/asan/test_base
	ASAN_OPTIONS=detect_leaks=1 $(BUILD)/asan/test_threads
	ASAN_OPTIONS=detect_leaks=1 $(BUILD)/asan/leak_loop

fuzz-build: setup
	swift build --scratch-path .build-fuzz --product tengrad $(FUZZ_SWIFT) $(SWIFT_BLAS) $(SWIFT_BLAS_RPATH)
	mkdir -p $(BUILD)/fuzz
	for h in calls state; do \
	  $(ASAN_CC) -g -O1 -fsanitize=fuzzer,address,undefined -fuse-ld=bfd -Iinclude Tests/fuzz/fuzz_$$h.c \
	    -o $(BUILD)/fuzz/fuzz_$$h -L$(FUZZ_DIR) -ltengrad -Wl,-rpath,'$(CURDIR)/$(FUZZ_DIR)' || exit 1; \
	done

fuzz: fuzz-build ## Run both libFuzzer harnesses for FUZZ_SECONDS each (default 60)
	for h in calls state; do \
	  mkdir -p $(BUILD)/fuzz/corpus-$$h; \
	  $(BUILD)/fuzz/fuzz_$$h -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 -print_final_stats=1 \
	    -artifact_prefix=$(BUILD)/fuzz/ $(BUILD)/fuzz/corpus-$$h Tests/fuzz/corpus/$$h 2>&1 \
	    | grep -E "DONE|stat::number_of_executed_units|ERROR|SUMMARY|deadly" ; \
	  test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

fuzz-smoke: ## Both fuzzers for 15 s each (part of `make test`)
	$(MAKE) fuzz FUZZ_SECONDS=15

bench: build ## Benchmark table (not a test): seconds, GFLOP/s, ratio to OpenBLAS sgemm
	swift build -c release --product tengrad-bench $(SWIFT_FLAGS)
	@# OpenBLAS's idle workers spin 2^OPENBLAS_THREAD_TIMEOUT cycles after each call, sharing a core
	@# with our own second thread: the README's setting for C and Swift programs (and the Python
	@# binding's) is 20, unless you set another.
	OPENBLAS_THREAD_TIMEOUT=$${OPENBLAS_THREAD_TIMEOUT:-20} $(RELEASE_DIR)/tengrad-bench
	@echo; echo "== TENGraD vs numpy (authors' style) vs KFAC inverse update, one BLAS thread per pool"
	OPENBLAS_NUM_THREADS=1 $(PYTHON) benchmarks/compare.py
	@echo; echo "== the same with two BLAS threads per pool (numpy's and ours contend for 2 cores)"
	OPENBLAS_NUM_THREADS=2 $(PYTHON) benchmarks/compare.py
	@echo; echo "== conv layers: TENGraD vs the authors' explicit path (PyTorch, AX kept), refresh and reuse"
	OPENBLAS_NUM_THREADS=2 $(PYTHON) benchmarks/conv_compare.py
	@echo; echo "== linear layers over tokens (transformer shapes): strategies, representation, vs expand-KFAC"
	OPENBLAS_NUM_THREADS=2 $(PYTHON) benchmarks/sequence_bench.py
	@echo; echo "== standard transformer modules' exact blocks (LayerNorm, MHA projections, MLP) vs an AdamW step"
	OPENBLAS_NUM_THREADS=2 $(PYTHON) benchmarks/transformer_blocks.py
	@echo; echo "== tengrad.torch's step() against the library's calls alone (reuse steps, MLPs)"
	$(PYTHON) benchmarks/step_overhead.py

clean: ## Remove build outputs
	rm -rf .build $(BUILD)
