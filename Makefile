# Developer entry points. Everything runs from the project's own virtualenv (.venv).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstalled only when pyproject.toml changes (or the venv is new).
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint proto

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(BIN)/paycluster demo

test: venv
	$(BIN)/pytest -q --durations=30

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# The one command that regenerates the gRPC code from region_node/rpc/region.proto.
proto: venv
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. region_node/rpc/region.proto
