# The two commands of the README's Quickstart:
#   make up     set up a virtualenv and run the studio on its embedded defaults (SQLite, local files,
#               the file-system broker; the built-in tiny demo model when there is no GPU)
#   make test   run the test suite: SQLite and the file-system broker, then PostgreSQL and Redis (the
#               second pass leaves out what does not touch the database: the engine, photo decoding,
#               the schema check, the fault tests, which start a private PostgreSQL of their own, and
#               the browser tests, which drive pages whose queries the second pass already runs)
#
# TORCH is what pip installs first. The default is the CPU build; on a GPU machine use for example
#   make up TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install up test lint bench

$(BIN)/studio: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/studio

install: $(BIN)/studio

up: install
	$(BIN)/studio up

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy app worker

test: install lint
	$(BIN)/pytest
	STUDIO_TEST_DB=postgres $(BIN)/pytest tests/app tests/worker -m "not browser" --ignore=tests/worker/engine \
		--ignore=tests/app/photos --ignore=tests/app/test_openapi.py --ignore=tests/worker/test_faults.py

bench: install
	$(BIN)/python bench/train.py
	$(BIN)/python bench/job.py
	$(BIN)/python bench/web.py
