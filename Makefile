# Developer entry points. Everything runs from the project's own virtualenv (.venv).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstalled only when pyproject.toml changes (or the venv is new).
STAMP := $(VENV)/.installed

.PHONY: venv demo test fuzz lint proto

venv: $(STAMP)

# uv (from PyPI, into the venv) installs the project in ~20 s where pip takes minutes; pip
# is the fallback if uv cannot be had. The tools (install-tools.sh) download meanwhile.
$(STAMP): pyproject.toml scripts/install-tools.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install -q uv || true
	bash scripts/install-tools.sh $(VENV) & tools=$$!; \
	if test -x $(BIN)/uv; then $(BIN)/uv pip install -q --python $(BIN)/python -e ".[dev]"; \
	else $(BIN)/pip install -q -e ".[dev]"; fi; status=$$?; \
	wait $$tools && test $$status -eq 0
	touch $(STAMP)

demo: venv
	$(BIN)/paycluster demo

# The suite runs on three pytest-xdist workers (it waits on servers as much as it computes:
# one process keeps a 2-core machine about one core busy, two about 1.4 cores, three about
# 1.75; measured on fresh clones, docs/testing.md). loadfile keeps a module on one
# worker, so a module's lab starts once; --no-loadscope-reorder keeps tests/conftest.py's
# order (slowest modules first) instead of xdist's (most tests first). Each worker picks
# ports from a slice of its own (PAYCLUSTER_PORT_SLICE). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
test: venv
	$(BIN)/pytest -q --durations=30 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

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
