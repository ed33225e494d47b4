# aftertune: `make run` runs the demo on embedded defaults, `make test` runs lint, types and tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest clean

# torch first and pinned: an unpinned torch (or torchvision) pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(VENV): $(STAMP)

run: $(VENV)
	$(BIN)/aftertune serve

lint: $(VENV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)
	$(BIN)/mypy store daemon

pytest: $(VENV)
	$(BIN)/pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .aftertune
