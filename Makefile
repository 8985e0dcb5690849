# One entry point for people and CI: `make serve`, `make test`, `make bench`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARCHIVES := model_store/digits.mar model_store/digits_v2.mar model_store/minilm.mar
PROTOS_STAMP := api/rpc/generated/.stamp

.PHONY: venv protos archives tools serve test lint typecheck pytest bench clean

venv: $(STAMP)

# torch first, pinned: a CPU build of exactly this version is on disk; letting another package
# pull torch in resolves a multi-GB CUDA build instead.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps kserve==0.21.0
	@touch $@

protos: $(PROTOS_STAMP)

# Every .proto, nested ones (google/rpc/status.proto) included.
$(PROTOS_STAMP): $(STAMP) $(shell find api/rpc/protos -name '*.proto') scripts/gen_protos.py
	$(BIN)/python scripts/gen_protos.py
	@touch $@

archives: $(ARCHIVES)

$(ARCHIVES) &: $(STAMP) $(wildcard export/*.py export/models/*.py handlers/*.py)
	HF_HUB_OFFLINE=1 $(BIN)/torchgate export --all

serve: venv protos archives
	HF_HUB_OFFLINE=1 $(BIN)/torchgate serve --config config.properties

lint: venv
	$(BIN)/ruff check api export handlers tests scripts benchmarks docker
	$(BIN)/ruff format --check api export handlers tests scripts benchmarks docker

typecheck: venv protos
	$(BIN)/mypy

# Real Prometheus (scrape tests), wrk (bench tests), HAProxy (scale-out tests) and Java (the
# tests that compare with a real TorchServe; Debian's default-jre-headless), from Debian's
# packages when missing.
# Needs root or sudo; outside CI a failure is only a warning (those tests then skip, saying why).
tools:
	./scripts/install_tools.sh prometheus wrk haproxy java || [ -z "$$CI" ]

# Two pytest workers, one per core; a test module stays on one worker (its servers start once).
PYTEST_ARGS ?= -n 2 --dist loadfile

pytest: venv protos archives tools
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# wrk drives the load (Debian package); the suite itself lives in benchmarks/.
bench: venv protos archives
	./scripts/install_tools.sh wrk
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks --out docs/benchmarks.md
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.v2_throughput --append docs/benchmarks.md

clean:
	rm -rf build model_store/*.mar api/rpc/generated/*_pb2*.py* $(PROTOS_STAMP)
