# budgetd: `make run` starts the service on SQLite, `make test` runs the tests.
# Both create .venv and install the project (editable, with its extras) on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:50051
DB ?= sqlite+aiosqlite:///./budgetd.db

.PHONY: run test lint typecheck protos check-protos bench bench-quick demo clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing budgetd and its dependencies into $(VENV) ..."
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,dev]'
	@touch $(STAMP)

run: $(STAMP)  ## start budgetd on 127.0.0.1:50051 with ./budgetd.db
	$(BIN)/budgetd serve --listen $(LISTEN) --db '$(DB)'

test: $(STAMP)  ## lint, type-check and run every test (PostgreSQL at 127.0.0.1:5432)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff only
	$(BIN)/ruff check .

typecheck: $(STAMP)  ## mypy --strict only
	$(BIN)/mypy

protos: $(STAMP)  ## regenerate budget_client/_proto from protos/
	$(BIN)/python scripts/gen_protos.py

bench: $(STAMP)  ## full benchmark suite, writes bench/results/*.json
	$(BIN)/python -m bench.run --mode full

bench-quick: $(STAMP)  ## the benchmarks in quick mode (under 2 minutes)
	$(BIN)/python -m bench.run --mode quick

demo: $(STAMP)  ## budgetd + a local OpenAI-compatible server + three apps sharing one budget
	$(BIN)/python -m budget_client.demo

clean:  ## remove the virtualenv, the local database and its admin key
	rm -rf $(VENV) budgetd.db budgetd.db-wal budgetd.db-shm budgetd-admin.key
