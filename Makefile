# The two commands a new user needs: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REPO ?= model_repository
STAMP := $(VENV)/.installed

.PHONY: venv models demo test lint stubs bench gpu-check clean system-deps

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
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

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

# Best effort: the system services some tests run for real (skipped with a message if absent).
system-deps:
	@for pkg in prometheus redis-server docker-compose; do \
		command -v $$pkg >/dev/null 2>&1 || NEED="$$NEED $$pkg"; \
	done; \
	if [ -n "$$NEED" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$NEED) >/dev/null 2>&1 \
		|| echo "system-deps: could not install$$NEED; the tests that need them will skip"; \
	fi
