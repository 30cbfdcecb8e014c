# The two commands a new user needs: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REPO ?= model_repository
STAMP := $(VENV)/.installed

.PHONY: venv models demo test lint stubs bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[server,train,dev]"
	touch $(STAMP)

# The default model repository that the demo and the tests serve (trained, seeded).
$(REPO)/.built: $(STAMP)
	$(BIN)/rnnserve build-defaults --repository $(REPO)
	touch $(REPO)/.built

models: $(REPO)/.built

demo: $(REPO)/.built
	$(BIN)/python -m rnnserve.server.demo --repository $(REPO)

test: $(REPO)/.built
	RNNSERVE_TEST_REPOSITORY=$(REPO) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

stubs: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --grpc_python_out=proto \
		--pyi_out=proto proto/rnnserve/v1/*.proto

bench: $(REPO)/.built
	$(BIN)/rnnserve bench --repository $(REPO)

clean:
	rm -rf $(VENV) $(REPO) .pytest_cache
