# Developer entry points. Everything runs from the project's own virtualenv (.venv).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstalled only when pyproject.toml changes (or the venv is new).
STAMP := $(VENV)/.installed

.PHONY: venv demo test fuzz lint proto

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(BIN)/paycluster demo

test: venv
	$(BIN)/pytest -q

# The long, on-demand run: the model-based test of the books with fresh seeds and many
# sequences, then schemathesis over the OpenAPI document with an admin and a customer key.
FUZZ_EXAMPLES ?= 200
FUZZ_STEPS ?= 40
FUZZ_SECONDS ?= 300
fuzz: venv
	$(BIN)/pip install -q -e ".[dev,fuzz]"
	PAYCLUSTER_MODEL_FUZZ=1 PAYCLUSTER_MODEL_EXAMPLES=$(FUZZ_EXAMPLES) PAYCLUSTER_MODEL_STEPS=$(FUZZ_STEPS) \
		$(BIN)/pytest -q --timeout 0 tests/test_model_books.py
	$(BIN)/python -m tests.fuzz_api --max-time $(FUZZ_SECONDS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# The one command that regenerates the gRPC code from region_node/rpc/region.proto.
proto: venv
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. region_node/rpc/region.proto
