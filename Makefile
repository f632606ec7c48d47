# Two commands do everything, each on a fresh machine: `make bench` (the main job) and `make test`.
# Both create .venv and install the CPU build of torch 2.13.0 first, so nothing huge is downloaded.
PY      := .venv/bin/python
STAMP   := .venv/.installed
TORCH   := torch==2.13.0

.PHONY: setup test lint demo bench bench-full bench-engines clean vllm-setup test-vllm serve-bench serve-load

BENCH_OUT := runs/bench

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,onnx,eval]"
	touch $(STAMP)

lint: $(STAMP)
	.venv/bin/ruff check src tests scripts
	.venv/bin/ruff format --check src tests scripts

test: lint
	$(PY) -m pytest -q tests

# The headline latency comparison, the real model first: SmolLM2-135M-Instruct with its real weights
# (fetched by `zflora models get` when absent; r = 16), then LLaMA-3.2-1B's shape (random weights, r = 64).
# Base, PEFT LoRA and fused zFLoRA, prefill and decode, in the dtype this machine runs natively (bf16 with
# AVX-512 BF16 / AMX or a GPU, else fp32). Where the model cannot be fetched, the 1B shape runs alone.
REAL_MODEL   := smollm2-135m-instruct
REAL_METHODS := base,lora,lora-merged,zflora,zflora-mha

bench: $(STAMP)
	@if .venv/bin/zflora models get $(REAL_MODEL) >/dev/null; then \
		.venv/bin/zflora bench --model $(REAL_MODEL) --rank 16 --methods $(REAL_METHODS) --repeats 5 \
			--json $(BENCH_OUT)/bench-$(REAL_MODEL).json --chart $(BENCH_OUT)/bench-$(REAL_MODEL).png \
			--markdown $(BENCH_OUT)/bench-$(REAL_MODEL).md; \
	else \
		echo "make bench: $(REAL_MODEL) could not be fetched (see above); measuring LLaMA-3.2-1B's shape alone"; \
	fi
	.venv/bin/zflora bench --json $(BENCH_OUT)/bench.json --chart $(BENCH_OUT)/bench.png --markdown $(BENCH_OUT)/bench.md

# The full study: every method, the one-projection sweep, adapter switching, 5 repetitions after 2 warm-up.
bench-full: $(STAMP)
	.venv/bin/zflora bench --full --json $(BENCH_OUT)/bench-full.json --chart $(BENCH_OUT)/bench-full.png \
		--markdown $(BENCH_OUT)/bench-full.md

# One table across engines on the real model: eager transformers, torch.compile, ONNX Runtime fp32 and int8, and
# vLLM when .venv-vllm exists (make vllm-setup); batch 1 and 8; each engine in a process of its own.
bench-engines: $(STAMP)
	.venv/bin/zflora models get $(REAL_MODEL) >/dev/null
	.venv/bin/zflora bench-engines --model $(REAL_MODEL) --json $(BENCH_OUT)/engines-$(REAL_MODEL).json \
		--chart $(BENCH_OUT)/engines-$(REAL_MODEL).png --markdown $(BENCH_OUT)/engines-$(REAL_MODEL).md

# vLLM serving: its own environment, since vLLM pins its own transformers.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
SERVE_OUT  := runs/serve-bench

vllm-setup: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt scripts/setup-vllm.sh
	scripts/setup-vllm.sh $(VLLM_VENV)
	touch $(VLLM_STAMP)

# vLLM parity tests (greedy tokens of the plugin = the Hugging Face fused model's; zero B = vLLM's base),
# and the benchmark's decode check on the transformers version vLLM pins.
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_serve.py tests/test_bench.py::test_decode_steps_read_the_filled_context

# Serving latency in one vLLM build: base vs vLLM LoRA vs the zFLoRA plugin, LLaMA-3.2-1B's shape.
serve-bench: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/zflora serve-bench --json $(SERVE_OUT)/serve-bench.json --chart $(SERVE_OUT)/serve-bench.png \
		--markdown $(SERVE_OUT)/serve-bench.md

# Serving under load on the real model: vLLM's OpenAI server, 1, 4 and 16 concurrent clients (vLLM's own load
# generator, loopback only), base vs vLLM LoRA vs the zFLoRA plugin.
serve-load: $(STAMP) $(VLLM_STAMP)
	.venv/bin/zflora models get $(REAL_MODEL) >/dev/null
	$(VLLM_VENV)/bin/zflora serve-load --model $(REAL_MODEL) --json $(SERVE_OUT)/serve-load-$(REAL_MODEL).json \
		--chart $(SERVE_OUT)/serve-load-$(REAL_MODEL).png --markdown $(SERVE_OUT)/serve-load-$(REAL_MODEL).md

demo: $(STAMP)
	.venv/bin/zflora demo

clean:
	rm -rf .venv $(VLLM_VENV) .pytest_cache .ruff_cache src/*.egg-info
