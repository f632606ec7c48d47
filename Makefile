# Two commands do everything, each on a fresh machine: `make bench` (the main job) and `make test`.
# Both create .venv and install the CPU build of torch 2.13.0 first, so nothing huge is downloaded.
PY      := .venv/bin/python
STAMP   := .venv/.installed
TORCH   := torch==2.13.0

.PHONY: setup test lint demo bench clean

BENCH_OUT := runs/bench

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	.venv/bin/ruff check src tests
	.venv/bin/ruff format --check src tests

test: lint
	$(PY) -m pytest -q tests

# The paper's latency study on LLaMA-3.2-1B's shape (random weights), about 8.5 minutes on 2 CPU cores.
bench: $(STAMP)
	.venv/bin/zflora bench --json $(BENCH_OUT)/bench.json --chart $(BENCH_OUT)/bench.png --markdown $(BENCH_OUT)/bench.md

demo: $(STAMP)
	.venv/bin/zflora demo

clean:
	rm -rf .venv .pytest_cache .ruff_cache src/*.egg-info
