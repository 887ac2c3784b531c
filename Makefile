# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINTED := mergekit_expert tests examples benchmarks build_autoload.py mergekit_expert_autoload.py

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml build_autoload.py mergekit_expert_autoload.pth
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first; an unpinned torch would pull a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo/run.py --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Benchmarks write their results under benchmarks/results/ (the GPU one,
# benchmarks/gpu_scale.py, needs a GPU machine and is run by hand).
bench: $(STAMP)
	$(BIN)/python benchmarks/quality.py
	$(BIN)/python benchmarks/ceiling.py --regime lora
	$(BIN)/python benchmarks/perf.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python examples/demo/run.py --out demo_out
	$(BIN)/python benchmarks/topk_cost.py demo_out

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy mergekit_expert

clean:
	rm -rf demo_out bench_out .pytest_cache
