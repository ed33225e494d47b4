# aftertune: `make run` runs the demo on real text, `make test` runs lint, types and tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and aftertune, what `make run` needs; then pytest, ruff and mypy for `make test`
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: run run-tiny test lint typecheck pytest test-avalanche clean

# torch first and pinned: an unpinned torch (or torchvision) pulls a multi-GB CUDA build.
# -qq: errors only, so `make run` shows the demo, not pip's progress and notices.
# --no-compile: no .pyc for all of torch and transformers up front (measured: 84 -> 44 s of
# CPU); Python compiles the modules a command imports the first time it runs.
$(STAMP): pyproject.toml
	@echo "installing into $(VENV): torch 2.13.0 (CPU), then aftertune and its dependencies"
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/pip install -qq --no-compile torch==2.13.0
	@$(BIN)/pip install -qq --no-compile -e .
	@touch $(STAMP)

# The dev tools come second, so `make run` does not wait for them (measured: 4.6 s of 45).
$(DEVSTAMP): $(STAMP)
	@$(BIN)/pip install -qq --no-compile -e '.[dev]'
	@touch $(DEVSTAMP)

$(VENV): $(DEVSTAMP)

# avalanche-lib, the reference oracle of tests/avalanche, lives in its own virtualenv: it
# needs torchvision, hence torch 2.14.1 and its CUDA wheels (~6.3 GB, ~8 min from scratch).
# Never install it into .venv. aftertune goes in last and without deps, as its torch==2.13.0
# pin would replace torch; its other dependencies and the avalanche extra come from
# pyproject.toml, so this env follows it. -qq: pip's warnings about this machine's index
# configuration would otherwise drown the output.
AVENV := .venv-avalanche
AVBIN := $(AVENV)/bin
AVSTAMP := $(AVENV)/.installed
AVREQS := import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	print("\n".join([d for d in p["dependencies"] if not d.startswith("torch=")] \
	+ p["optional-dependencies"]["avalanche"] + ["pytest>=8"]))

$(AVSTAMP): pyproject.toml
	test -x $(AVBIN)/python || $(PY) -m venv $(AVENV)
	$(AVBIN)/pip install -qq torch==2.14.1 torchvision==0.29.1
	$(AVBIN)/python -c '$(AVREQS)' > $(AVENV)/requirements.txt
	$(AVBIN)/pip install -qq -r $(AVENV)/requirements.txt
	$(AVBIN)/pip install -qq --no-deps -e .
	touch $(AVSTAMP)

$(AVENV): $(AVSTAMP)

# The loop on real text: the MiniLM encoder (the ranking kind) learns a news-topic task, then
# an emotion task, and rejects a label-flipped batch; the pulled bundle answers. Within
# 3 minutes on 2 idle cores, the install included (docs/benchmarks.md).
run: $(STAMP)
	$(BIN)/aftertune demo

# The same loop on the shipped 0.9M-parameter generative model, learning character puzzles.
run-tiny: $(STAMP)
	$(BIN)/aftertune demo --base embedded:tiny

lint: $(DEVSTAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(DEVSTAMP)
	$(BIN)/mypy daemon learners store

# Tests run in up to 4 worker processes (pytest-xdist), one test file per worker at a time
# (--dist loadfile) so a module's fixtures are built once: most tests use one core, and on 2
# cores this halves the suite (measured: 16 min 12 s serial, 9 min 52 s with -n 2).
pytest: $(DEVSTAMP)
	$(BIN)/pytest -q -n auto --maxprocesses 4 --dist loadfile

# AFTERTUNE_REQUIRE_AVALANCHE: a missing avalanche fails this run instead of skipping it.
test-avalanche: $(AVENV)
	AFTERTUNE_REQUIRE_AVALANCHE=1 $(AVBIN)/pytest -q -m avalanche tests/avalanche

test: lint typecheck pytest test-avalanche

clean:
	rm -rf $(VENV) .aftertune
