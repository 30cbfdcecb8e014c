# The two commands a new user needs: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REPO ?= model_repository
STAMP := $(VENV)/.installed

.PHONY: venv models demo test lint stubs bench gpu-check clean system-deps compose-test image

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[server,train,dev]"
	touch $(STAMP)

# The default model repository that the demo and the tests serve: trained, seeded, ~70 s on
# 2 cores (models/README.md). Rebuilt when the training code changes.
$(REPO)/.built: $(STAMP) $(wildcard models/*.py)
	$(BIN)/rnnserve build-defaults --repository $(REPO)
	touch $(REPO)/.built

models: $(REPO)/.built

demo: $(STAMP) $(REPO)/.built
	$(BIN)/python examples/demo.py --repository $(REPO)

test: $(STAMP) $(REPO)/.built system-deps
	RNNSERVE_TEST_REPOSITORY=$(REPO) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy server

stubs: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --grpc_python_out=proto \
		--pyi_out=proto proto/rnnserve/v1/*.proto

# The benchmark builds its own LSTM (the shape of benchmarks/README.md); BENCH_ARGS=--quick etc.
bench: $(STAMP)
	$(BIN)/rnnserve bench $(BENCH_ARGS)

# The GPU check (benchmarks/gpu_check.sh, ../shared/GPU.md): fetch the wheels into .gpu/ and
# print the device calls that install them and run the GPU tests and benchmarks on the host.
gpu-check:
	bash benchmarks/gpu_check.sh prepare

clean:
	rm -rf $(VENV) $(REPO) .pytest_cache

# The docker-compose stack run for real (tests/deploy/test_compose_stack.py, also part of
# `make test`): builds the images (the base with mmdebstrap if no registry has it), starts a
# private dockerd if none runs, brings the stack up, stops and kills a replica under load, and
# tears it all down. Skipped with a message where Docker cannot be started. README, Deployment.
COMPOSE_REPORT ?= .cache/compose-report.json
compose-test: $(STAMP) $(REPO)/.built system-deps
	@rm -f $(COMPOSE_REPORT)
	RNNSERVE_TEST_REPOSITORY=$(REPO) RNNSERVE_COMPOSE_REPORT=$(COMPOSE_REPORT) \
		$(BIN)/python -m pytest -q tests/deploy/test_compose_stack.py $(PYTEST_ARGS)
	@if [ -f $(COMPOSE_REPORT) ]; then cat $(COMPOSE_REPORT); fi

# The server image with the default models, for a Docker engine you run (CPU; for CUDA:
# IMAGE_ARGS="--build-arg ORT_EXTRAS=cuda,cudnn" IMAGE=rnnserve:cuda).
IMAGE ?= rnnserve:latest
image: $(REPO)/.built
	docker build --build-arg MODEL_REPOSITORY=$(REPO) $(IMAGE_ARGS) -t $(IMAGE) .

# Best effort: the system services some tests run for real (skipped with a message if absent),
# as command:package.
SYSTEM_DEPS := prometheus:prometheus redis-server:redis-server docker-compose:docker-compose \
	dockerd:docker.io mmdebstrap:mmdebstrap
system-deps:
	@for dep in $(SYSTEM_DEPS); do \
		command -v $${dep%%:*} >/dev/null 2>&1 || NEED="$$NEED $${dep##*:}"; \
	done; \
	if [ -n "$$NEED" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$NEED) >/dev/null 2>&1 \
		|| echo "system-deps: could not install$$NEED; the tests that need them will skip"; \
	fi
