# TENGraD — build, test, demo, benchmark. `make help` lists the targets.
# `make demo` and `make test` each install what a fresh Debian machine lacks (see `setup`).

SHELL        := /bin/bash
CC           ?= cc
CXX          ?= c++
BUILD        := build
RELEASE_DIR  := .build/release
LIB          := $(RELEASE_DIR)/libtengrad.so
DATA_SRC     := /usr/share/datasets/fashion-mnist
DATA         := $(BUILD)/data
PYTHON       ?= python3
CWARN        := -Wall -Wextra -Werror
LINK_TENGRAD := -L$(RELEASE_DIR) -ltengrad -Wl,-rpath,$(abspath $(RELEASE_DIR))
APT_PACKAGES := libopenblas-dev liblapacke-dev dataset-fashion-mnist
PIP_PACKAGES := numpy pytest xxhash
export OPENBLAS_NUM_THREADS ?= 2

.PHONY: help setup build test test-swift test-c test-python test-example demo bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: ## Install the apt and pip packages a fresh machine lacks (no-op when present)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@$(PYTHON) -c "import numpy, pytest, xxhash" 2>/dev/null || $(PYTHON) -m pip install -q $(PIP_PACKAGES)

build: setup ## Build libtengrad.so and the Swift products (release)
	swift build -c release

$(DATA)/.done: | setup
	mkdir -p $(DATA)
	for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do \
	  gzip -dc $(DATA_SRC)/$$f.gz > $(DATA)/$$f; done
	touch $@

$(BUILD)/mlp: examples/c/mlp.c include/tengrad.h build
	mkdir -p $(BUILD)
	$(CC) -std=c11 -O2 $(CWARN) -Iinclude examples/c/mlp.c -o $@ $(LINK_TENGRAD) -lopenblas -lm
	$(CXX) -std=c++17 -O2 $(CWARN) -Iinclude -x c++ examples/c/mlp.c -o $(BUILD)/mlp-cxx $(LINK_TENGRAD) -lopenblas -lm

demo: $(BUILD)/mlp $(DATA)/.done ## Main job: C 784-128-10 MLP on Fashion-MNIST, TENGraD vs SGD
	$(BUILD)/mlp --data $(DATA)

test: test-swift test-c test-python test-example ## Run every test suite (what CI runs)

test-swift: setup ## Swift tests of the core against the dense float64 oracle
	swift test

test-c: build ## C ABI tests, compiled as C11 and C++17 with warnings as errors
	mkdir -p $(BUILD)
	$(CC) -std=c11 -O1 $(CWARN) -Iinclude Tests/c/test_abi.c -o $(BUILD)/test_abi $(LINK_TENGRAD) -lm
	$(CXX) -std=c++17 -O1 $(CWARN) -Iinclude -x c++ Tests/c/test_abi.c -o $(BUILD)/test_abi_cxx $(LINK_TENGRAD) -lm
	$(CC) -std=c11 -O1 $(CWARN) -Iinclude Tests/c/test_threads.c -o $(BUILD)/test_threads $(LINK_TENGRAD) -lpthread
	$(BUILD)/test_abi
	$(BUILD)/test_abi_cxx
	$(BUILD)/test_threads

test-python: build ## pytest of the Python binding
	cd bindings/python && $(PYTHON) -m pytest -q tests

test-example: $(BUILD)/mlp $(DATA)/.done ## The examples on real data; the C trainer checks that TENGraD lowers the loss
	$(BUILD)/mlp --data $(DATA) --epochs 1 --train-limit 6000 --test-limit 2000 --check
	$(BUILD)/mlp-cxx --data $(DATA) --epochs 1 --train-limit 6000 --test-limit 2000 --fisher empirical --check
	$(PYTHON) examples/python/numpy_mlp.py --epochs 1 --train-limit 3000
	$(PYTHON) examples/python/numpy_conv.py --epochs 1 --train-limit 2000
	swift build -c release --product tengrad-swift-example
	$(RELEASE_DIR)/tengrad-swift-example $(DATA) 1

bench: build ## Benchmark table (not a test): seconds, GFLOP/s, ratio to OpenBLAS sgemm
	swift build -c release --product tengrad-bench
	$(RELEASE_DIR)/tengrad-bench
	@echo; echo "== TENGraD vs numpy (authors' style) vs KFAC inverse update, one BLAS thread per pool"
	OPENBLAS_NUM_THREADS=1 $(PYTHON) benchmarks/compare.py
	@echo; echo "== the same with two BLAS threads per pool (numpy's and ours contend for 2 cores)"
	OPENBLAS_NUM_THREADS=2 $(PYTHON) benchmarks/compare.py

clean: ## Remove build outputs
	rm -rf .build $(BUILD)
