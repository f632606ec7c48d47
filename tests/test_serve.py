"""vLLM serving: load-time fusion and adapter checks (always), and vLLM parity (where vLLM is installed).

The parity tests run in `.venv-vllm` (`make test-vllm`); in the main environment
they skip because vLLM is not installed there.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import (
    randomize_adapter,
    tiny_model,
)
from transformers import LlamaConfig, LlamaForCausalLM

import zflora
from zflora.adapter_io import AdapterError, checkpoint_fingerprint
from zflora.bench.harness import free_port
from zflora.cli import main
from zflora.modules import HiddenReadLinear
from zflora.registry import MARKER
from zflora.serve import ADAPTER_FIELD, ARCHITECTURE, PAD_FIELD, hf_overrides, read_for_config, serve_command
from zflora.serve.checkpoint import fuse_state_dict

CASES = {
    # name: (ZFLoRAConfig kwargs, tied embeddings)
    "all": (dict(r=8, alpha=16), False),
    "mha-lm_head-tied": (dict(r=4, alpha=8, targets="mha", lm_head=True), True),
    "q-down-no-expansion": (dict(r=6, alpha=3, targets=["q", "down"], expand_input=False), False),
}


def checkpoint_tensors(model: torch.nn.Module, tied: bool) -> dict[str, torch.Tensor]:
    """What save_pretrained writes: the state dict, without the tied LM head."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tied:
        sd.pop("lm_head.weight")
    return sd


@pytest.mark.parametrize("pad_to", [None, 32])
@pytest.mark.parametrize("case", list(CASES))
def test_fuse_state_dict_equals_hf_fused_model(tmp_path, case, pad_to):
    kwargs, tied = CASES[case]
    model = tiny_model(tie=tied)
    d = model.config.hidden_size
    sd = checkpoint_tensors(model, tied)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(**kwargs))
    randomize_adapter(model)
    zflora.save_adapter(model, tmp_path / "ad")
    adapter = read_for_config(model.config, tmp_path / "ad")
    cfg = adapter.config
    pad = zflora.fusion.padding(d, cfg.r, pad_to)
    assert pad > 0 or pad_to is None
    fused = dict(fuse_state_dict(sd.items(), adapter, tied, pad))
    zflora.fuse(model, pad_to=pad_to)

    def zeros(t: torch.Tensor, dim: int) -> torch.Tensor:  # the padding's zero channels after z
        return torch.cat([t, t.new_zeros(pad, t.shape[1]) if dim == 0 else t.new_zeros(t.shape[0], pad)], dim=dim)

    expected_names = set(sd) | ({"lm_head.weight"} if cfg.lm_head else set())
    expected_names |= {"model.zflora_A_in"} if cfg.expand_input else set()
    assert set(fused) == expected_names
    for name, t in fused.items():
        if name == "model.zflora_A_in":
            want = zeros(model.model.embed_tokens.zflora_A_in, 0)  # the HF embedding pads after A_in h instead
        elif name == "lm_head.weight":
            head = model.lm_head  # the HF model keeps the head unfused (it is the output merge)
            want = head.weight
            if cfg.lm_head:
                want = zeros(torch.cat([head.weight, cfg.scaling * head.zflora_B], dim=1), 1)
        elif name == "model.embed_tokens.weight":
            want = model.model.embed_tokens.weight
        else:
            module_name, attr = name.rsplit(".", 1)
            module = model.get_submodule(module_name)
            want = getattr(module, attr)
            if isinstance(module, HiddenReadLinear):  # untargeted input projection: zero columns for z
                want = torch.cat([want, want.new_zeros(want.shape[0], cfg.r + pad)], dim=1)
        assert torch.equal(t, want.detach()), name
        if name.endswith(("q_proj.weight", "gate_proj.weight")):
            assert t.shape[1] == d + cfg.r + pad, name
        if name.endswith(("o_proj.weight", "down_proj.weight", "norm.weight")):
            assert t.shape[0] == d + cfg.r + pad, name


def test_fuse_state_dict_biases_get_zeros_for_z(tmp_path):
    cfg = tiny_model().config
    cfg.attention_bias, cfg.mlp_bias = True, True
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    sd = checkpoint_tensors(model, False)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=4))
    randomize_adapter(model)
    zflora.save_adapter(model, tmp_path / "ad")
    fused = dict(fuse_state_dict(sd.items(), read_for_config(cfg, tmp_path / "ad"), False))
    zflora.fuse(model)
    for name in ("model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.o_proj.bias",
                 "model.layers.0.mlp.down_proj.bias"):  # fmt: skip
        assert torch.equal(fused[name], model.get_submodule(name.rsplit(".", 1)[0]).bias), name
    assert fused["model.layers.0.mlp.down_proj.bias"][-4:].abs().sum() == 0


def save_base(path, tied: bool = False, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A tiny LLaMA checkpoint that vLLM's CPU attention accepts (head_dim 32, GQA)."""
    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.2,
                  tie_word_embeddings=tied)  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**fields, **overrides})).eval()
    model.save_pretrained(path)
    return model


def test_hf_overrides_checks_adapter_before_vllm(tmp_path):
    model = save_base(tmp_path / "base")
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=4))
    zflora.save_adapter(model, tmp_path / "ad")
    over = hf_overrides(tmp_path / "ad", tmp_path / "base")
    assert over == {"architectures": [ARCHITECTURE], ADAPTER_FIELD: str((tmp_path / "ad").resolve())}
    save_base(tmp_path / "other", hidden_size=96)
    with pytest.raises(zflora.AdapterError, match="hidden_size: adapter 64, model 96"):
        hf_overrides(tmp_path / "ad", tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        hf_overrides(tmp_path / "nothing", tmp_path / "base")
    qwen = tiny_model("qwen2")
    with pytest.raises(zflora.UnsupportedModelError, match="model_type llama"):
        read_for_config(qwen.config, tmp_path / "ad")


def test_serve_dry_run_prints_the_vllm_command(tmp_path, capsys):
    model = save_base(tmp_path / "base")
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=4))
    zflora.save_adapter(model, tmp_path / "ad")
    main(["serve", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"), "--dry-run",
          "--", "--port", "8123"])  # fmt: skip
    out = capsys.readouterr().out
    assert "vllm.entrypoints.openai.api_server" in out and "--port 8123" in out
    assert ARCHITECTURE in out and "--served-model-name ad" in out and PAD_FIELD not in out
    main(["serve", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"), "--pad-to", "32", "--dry-run"])
    assert f'"{PAD_FIELD}": 32' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="pad_to: must be a positive integer"):
        main(["serve", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"), "--pad-to", "0",
              "--dry-run"])  # fmt: skip
    with pytest.raises(SystemExit, match="pad_to: pads a zFLoRA adapter's stream; name the adapter too"):
        main(["serve", "--model", str(tmp_path / "base"), "--pad-to", "32", "--dry-run"])
    (tmp_path / "ad" / "adapter_config.json").write_text("{")
    with pytest.raises(SystemExit, match="zflora serve: .*not valid JSON"):
        main(["serve", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"), "--dry-run"])
    with pytest.raises(SystemExit):
        main(["bench", "--port", "1"])  # unknown options are only passed through by `serve`
    with pytest.raises(SystemExit) as bad:  # a typo in zflora's own flags is refused, not passed to vLLM
        main(["serve", "--model", str(tmp_path / "base"), "--adaptr", str(tmp_path / "ad"), "--", "--port", "1"])
    assert bad.value.code == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(rank=0), "rank: must be a positive integer"), (dict(batch_sizes=()), "batch_sizes: must not be empty"),
     (dict(methods=("lora",)), "methods: must include 'base'"), (dict(targets="q"), "targets: must be 'all' or 'mha'"),
     (dict(preset="gpt2"), "preset: unknown 'gpt2'"), (dict(prompt_lens=(128, 0)), "prompt_lens: must be a positive")],
)  # fmt: skip
def test_serve_bench_config_validation(kwargs, match):
    from zflora.bench.config import ServeBenchConfig

    with pytest.raises(ValueError, match=match):
        ServeBenchConfig(**kwargs)


def test_serve_bench_without_vllm_says_how_to_get_it():
    from zflora.serve import vllm_available

    if vllm_available():
        pytest.skip("vLLM is installed here")
    with pytest.raises(SystemExit, match="make vllm-setup"):
        main(["serve-bench", "--layers", "1", "--no-progress"])


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(model=None), "model: serve-load needs a checkpoint with its tokenizer"), (dict(layers=2), "layers: "),
     (dict(concurrency=()), "concurrency: must not be empty"), (dict(concurrency=(1, 0)), "concurrency: must be a"),
     (dict(methods=("zflora",)), "methods: must include 'base'"), (dict(output_len=0), "output_len: must be a")],
)  # fmt: skip
def test_serve_load_config_validation(kwargs, match):
    from zflora.bench.config import ServeLoadConfig

    with pytest.raises(ValueError, match=match):
        ServeLoadConfig(**kwargs)


def test_serve_load_serves_each_method_on_loopback(tmp_path):
    """One api_server command per method: the base alone, vLLM's LoRA under its own model name, and the zFLoRA
    plugin with the adapter checked and named in the overrides; the client sends clients x requests."""
    from zflora.bench.config import ServeLoadConfig
    from zflora.bench.load import Server, client_args, server_command
    from zflora.bench.vllm import prepare_checkpoints

    save_base(tmp_path / "base")
    cfg = ServeLoadConfig(model=tmp_path / "base", rank=4, concurrency=(1, 3), requests_per_client=2, pad_to=32)
    paths = prepare_checkpoints(cfg, torch.float32, tmp_path)
    cmds = {m: server_command(m, paths, cfg, "fp32", 8000 + i) for i, m in enumerate(("base", "lora", "zflora"))}
    for m, cmd in cmds.items():
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and "--no-enable-prefix-caching" in cmd
        assert cmd[cmd.index("--max-num-seqs") + 1] == "3" and cmd[cmd.index("--dtype") + 1] == "float32"
        assert ("--enable-lora" in cmd) == (m == "lora") and ("--hf-overrides" in cmd) == (m == "zflora")
    lora = cmds["lora"]
    assert lora[lora.index("--lora-modules") + 1] == f"lora={paths['lora']}"
    assert lora[lora.index("--max-lora-rank") + 1] == "8"  # vLLM's smallest rank bound above 4
    assert lora[lora.index("--served-model-name") + 1] == "lora-base"  # requests name the adapter, "lora"
    overrides = json.loads(cmds["zflora"][cmds["zflora"].index("--hf-overrides") + 1])
    assert overrides == {"architectures": [ARCHITECTURE], ADAPTER_FIELD: str(paths["zflora"].resolve()), PAD_FIELD: 32}
    assert cmds["zflora"][-2:] == ["--served-model-name", "zflora"]

    server = Server.__new__(Server)  # the fields the client reads, no process
    server.method, server.port = "lora", 8001
    args = client_args(server, cfg, paths["base"], 3, tmp_path)
    assert args[args.index("--num-prompts") + 1] == "6" and args[args.index("--max-concurrency") + 1] == "3"
    assert args[args.index("--served-model-name") + 1] == "lora" and args[args.index("--base-url") + 1].endswith(
        ":8001"
    )


def test_serve_load_a_server_that_dies_is_an_error_with_its_log(tmp_path):
    from zflora.bench.load import Server

    cmd = [sys.executable, "-c", "print('no such model'); raise SystemExit(3)", "--port", "1"]
    server = Server("lora", cmd, tmp_path / "server-lora.log", kv_cache_gib=1)
    with pytest.raises(RuntimeError, match=r"the lora server exited \(3\):\nno such model"):
        server.wait_ready(timeout=60)
    server.stop()


def test_serve_load_reports_throughput_against_base():
    """Throughput is reported as its inverse (ms per output token), so ratios and targets read like latency."""
    from zflora.bench.load import check_targets, markdown
    from zflora.bench.report import rows

    phases = ("output", "ttft p50", "ttft p99", "itl p50", "itl p99")
    per_method = {"base": {1: 10.0, 4: 5.0}, "zflora": {1: 10.2, 4: 5.5}}
    samples = {m: {(p, 128, c): [v, v] for c, v in by.items() for p in phases} for m, by in per_method.items()}
    result_rows = rows(samples)
    targets = check_targets(result_rows)
    assert [(t["met"], round(t["value"], 3)) for t in targets] == [(True, 1.02), (False, 1.1)]
    result = {"settings": {"model": "/m/smollm2", "rank": 16, "targets": "all", "input_len": 128, "output_len": 64,
                           "requests_per_client": 2, "repeats": 2, "warmup": 0, "concurrency": [1, 4]},
              "environment": {"vllm": "0.32.0", "date": "today", "hardware": "x", "threads": 2, "dtype": "fp32",
                              "torch": "2", "transformers": "5", "device": "cpu"},
              "interleaved": True, "startup_s": {"base": 1.0, "zflora": 1.0}, "rows": result_rows,
              "targets": targets}  # fmt: skip
    text = markdown(result)
    assert "| 4 | base | 200.0 | 5.0 | 5.0 | 5.0 | 5.0 |" in text
    assert "| 4 | zflora | 181.8 (0.909x) | 5.5 (1.100x)" in text


# --------------------------------------------------------------------------- vLLM parity


def vllm_tokens(model_dir, prompts, n: int, overrides=None, eager: bool = True) -> list[list[int]]:
    """Greedy tokens from a fresh vLLM engine in fp32."""
    from vllm import LLM, SamplingParams

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(model=str(model_dir), skip_tokenizer_init=True, dtype="float32", enforce_eager=eager,
              max_model_len=256, max_num_seqs=4, enable_prefix_caching=False, hf_overrides=overrides or {})  # fmt: skip
    out = llm.generate([{"prompt_token_ids": p} for p in prompts],
                       SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)  # fmt: skip
    del llm
    gc.collect()
    return [list(o.outputs[0].token_ids) for o in out]


def hf_tokens(model, prompts, n: int) -> list[list[int]]:
    """Greedy tokens from the Hugging Face model with its KV cache; EOS is a token like any other (ignore_eos)."""
    out = []
    for p in prompts:
        ids, past, tokens = torch.tensor([p]), None, []
        with torch.no_grad():
            for _ in range(n):
                step = model(ids, past_key_values=past, use_cache=True)
                past, nxt = step.past_key_values, int(step.logits[0, -1].argmax())
                tokens.append(nxt)
                ids = torch.tensor([[nxt]])
        out.append(tokens)
    return out


PROMPTS = [[1, 5, 9, 22, 7], [3] + list(range(10, 50)), [100, 2]]
N_TOKENS = 24


@pytest.fixture(scope="module")
def vllm():
    return pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm)")


@pytest.mark.parametrize(("case", "pad_to"), [("all", None), ("mha-lm_head-tied", None), ("mha-lm_head-tied", 32)])
def test_vllm_zflora_equals_hf_fused(vllm, tmp_path, case, pad_to):
    kwargs, tied = CASES[case]
    model = save_base(tmp_path / "base", tied=tied)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(**kwargs))
    randomize_adapter(model, std=0.3)
    zflora.save_adapter(model, tmp_path / "ad")
    zflora.fuse(model, pad_to=pad_to)
    want = hf_tokens(model, PROMPTS, N_TOKENS)
    overrides = hf_overrides(tmp_path / "ad", tmp_path / "base", pad_to)
    got = vllm_tokens(tmp_path / "base", PROMPTS, N_TOKENS, overrides)
    assert got == want
    # The adapter changes the output: the comparison above is not the base model's tokens twice.
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert hf_tokens(base, PROMPTS, N_TOKENS) != want


def test_vllm_zero_b_equals_vllm_base(vllm, tmp_path):
    model = save_base(tmp_path / "base")
    want = hf_tokens(model, PROMPTS, N_TOKENS)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8))  # B = 0, A and A_in random: exact at init
    zflora.save_adapter(model, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["zflora"]["r"] == 8
    base = vllm_tokens(tmp_path / "base", PROMPTS, N_TOKENS)
    zero = vllm_tokens(tmp_path / "base", PROMPTS, N_TOKENS, hf_overrides(tmp_path / "ad", tmp_path / "base"))
    assert zero == base == want


def test_vllm_compiled_equals_eager(vllm, tmp_path):
    """vLLM's default mode (torch.compile) runs the plugin too, with the same tokens."""
    model = save_base(tmp_path / "base")
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8))
    randomize_adapter(model, std=0.3)
    zflora.save_adapter(model, tmp_path / "ad")
    zflora.fuse(model)
    over = hf_overrides(tmp_path / "ad", tmp_path / "base")
    assert vllm_tokens(tmp_path / "base", PROMPTS, N_TOKENS, over, eager=False) == hf_tokens(model, PROMPTS, N_TOKENS)


def test_vllm_stories260k(vllm, tmp_path, stories_path):
    from vllm.platforms import current_platform

    config = LlamaConfig.from_pretrained(stories_path)
    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if config.head_dim not in sizes:
            pytest.skip(f"vLLM's CPU attention takes head sizes {sizes}; stories260K's is {config.head_dim}")
    model = zflora.models.load_local_model(stories_path)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8))
    randomize_adapter(model, std=0.05)
    zflora.save_adapter(model, tmp_path / "ad")
    zflora.fuse(model)
    prompts = [[1, 403, 407, 261, 378], [1, 20, 30, 40]]
    got = vllm_tokens(stories_path, prompts, 32, hf_overrides(tmp_path / "ad", stories_path))
    assert got == hf_tokens(model, prompts, 32)


def test_zflora_serve_answers_openai_completions(vllm, tmp_path, stories_path):
    """`zflora serve` starts vLLM's OpenAI server with the adapter fused; a text completion = the HF fused model's."""
    from transformers import AutoTokenizer

    model = save_base(tmp_path / "base", vocab_size=512)  # stories260K's tokenizer, so the server takes text
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(stories_path / name, tmp_path / "base" / name)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8))
    randomize_adapter(model, std=0.3)
    zflora.save_adapter(model, tmp_path / "my-task")
    zflora.fuse(model)
    prompt = "Once upon a time"
    want = hf_tokens(model, [AutoTokenizer.from_pretrained(tmp_path / "base")(prompt).input_ids], 16)[0]

    port = free_port()
    zflora_cmd = Path(sys.executable).with_name("zflora")
    cmd = [str(zflora_cmd), "serve", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "my-task"),
           "--", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "256", "--max-num-seqs", "2"]  # fmt: skip
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed below)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    before = vllm_processes()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                models = json.load(urllib.request.urlopen(f"{url}/models", timeout=5))
                break
            except OSError:
                assert time.time() < deadline, "server did not start"
                time.sleep(2)
        assert [m["id"] for m in models["data"]] == ["my-task"]
        body = {"model": "my-task", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}  # fmt: skip
        headers = {"Content-Type": "application/json"}
        req = urllib.request.Request(f"{url}/completions", json.dumps(body).encode(), headers)
        choice = json.load(urllib.request.urlopen(req, timeout=120))["choices"][0]
        assert choice["token_ids"] == want
        assert choice["text"]
    finally:
        server.terminate()  # `zflora serve` execs vLLM, so this signal reaches the server itself
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    left = vllm_processes() - before
    deadline = time.time() + 30
    while left and time.time() < deadline:
        time.sleep(1)
        left = vllm_processes() - before
    assert not left, f"vLLM processes outlived the server: {left}"


def vllm_processes() -> set[int]:
    """PIDs of live processes whose command line mentions vLLM (the server and its engine core)."""
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").lower()
            state = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if b"vllm" in cmdline and "zombie" not in state and int(proc.name) != os.getpid():
            pids.add(int(proc.name))
    return pids


def test_serve_bench_runs_all_three_engines(vllm, tmp_path):
    """A smoke run of `zflora serve-bench` on a tiny local checkpoint: base, vLLM LoRA and zFLoRA, all reported."""
    save_base(tmp_path / "base")
    out = tmp_path / "sb"
    main(["serve-bench", "--model", str(tmp_path / "base"), "--rank", "8", "--dtype", "fp32", "--enforce-eager",
          "--repeats", "2", "--warmup", "0", "--prompt-lens", "16", "--decode-tokens", "3", "--batch-sizes", "1,2",
          "--batch-tokens", "2", "--workdir", str(tmp_path), "--no-progress", "--json", str(out / "r.json"),
          "--markdown", str(out / "r.md"), "--chart", str(out / "r.png")])  # fmt: skip
    result = json.loads((out / "r.json").read_text())
    keys = {(r["method"], r["phase"], r["tokens"], r["batch"]) for r in result["rows"]}
    measures = {("ttft", 16, 1), ("decode", 128, 1), ("batch", 128, 1), ("batch", 128, 2)}
    assert keys == {(m, *k) for m in ("base", "lora", "zflora") for k in measures}
    assert all(r["n"] == 2 and r["median_ms"] > 0 and len(r["samples_ms"]) == 2 for r in result["rows"])
    assert {t["target"] for t in result["targets"]} == {"zflora ttft 16 tokens / base <= 1.050",
                                                        "zflora decode 128 tokens / base <= 1.050"}  # fmt: skip
    assert set(result["decode_timing"]) == {"base", "lora", "zflora"}
    assert (out / "r.png").stat().st_size > 0 and "| batch 2: ms per output token" in (out / "r.md").read_text()
    assert not list(tmp_path.glob("zflora-serve-bench-*"))  # the checkpoints were cleaned up


def test_serve_load_against_live_servers(vllm, tmp_path, stories_path):
    """`zflora serve-load` on a tiny checkpoint with a tokenizer: three OpenAI servers under 1 and 2 clients,
    every request completed, every measure reported, and no server left running."""
    save_base(tmp_path / "base", vocab_size=512)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(stories_path / name, tmp_path / "base" / name)
    out, before = tmp_path / "sl", vllm_processes()
    main(["serve-load", "--model", str(tmp_path / "base"), "--rank", "4", "--dtype", "fp32", "--enforce-eager",
          "--concurrency", "1,2", "--requests-per-client", "1", "--input-len", "16", "--output-len", "4",
          "--repeats", "1", "--warmup", "0", "--workdir", str(tmp_path), "--no-progress",
          "--json", str(out / "r.json"), "--markdown", str(out / "r.md"), "--chart", str(out / "r.png")])  # fmt: skip
    result = json.loads((out / "r.json").read_text())
    phases = ("output", "ttft p50", "ttft p99", "itl p50", "itl p99")
    keys = {(r["method"], r["phase"], r["batch"]) for r in result["rows"]}
    assert keys == {(m, p, c) for m in ("base", "lora", "zflora") for p in phases for c in (1, 2)}
    assert all(r["median_ms"] > 0 for r in result["rows"])
    assert sorted((r["method"], r["concurrency"], r["completed"], r["total_output_tokens"]) for r in result["runs"]) \
        == [(m, c, c, 4 * c) for m in ("base", "lora", "zflora") for c in (1, 2)]  # fmt: skip
    assert "| 2 | zflora |" in (out / "r.md").read_text() and (out / "r.png").stat().st_size > 0
    assert not list(tmp_path.glob("zflora-serve-load-*"))  # the adapters and the logs of a run that succeeded
    deadline = time.time() + 30
    while (left := vllm_processes() - before) and time.time() < deadline:
        time.sleep(1)
    assert not left, f"vLLM servers outlived serve-load: {left}"


# --------------------------------------------------------------------------- refusals and faults


def test_serve_resolves_and_checks_the_model(tmp_path, monkeypatch):
    """B13: a fetched model's name reached vLLM as ./NAME, and a missing model passed a dry run."""
    monkeypatch.setenv("ZFLORA_HOME", str(tmp_path / "home"))
    fetched = tmp_path / "home" / "models" / "smollm2-135m-instruct"
    save_base(fetched)
    (fetched / MARKER).write_text("{}")
    cmd = serve_command("smollm2-135m-instruct", None, [])
    assert cmd[cmd.index("--model") + 1] == str(fetched.resolve())
    with pytest.raises(FileNotFoundError, match="not a local checkpoint directory"):
        serve_command(str(tmp_path / "nonexistent"), None, [])
    with pytest.raises(SystemExit, match="zflora serve: .*nonexistent"):
        main(["serve", "--model", str(tmp_path / "nonexistent"), "--dry-run"])


def test_serve_refuses_an_adapter_from_another_base_of_the_same_shapes(tmp_path):
    """B14: serve compared the adapter with a meta-device base, where the fingerprint finds nothing."""
    model = save_base(tmp_path / "base", seed=0)
    save_base(tmp_path / "other", seed=1)  # same shapes, other weights
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=4))
    randomize_adapter(model)
    zflora.save_adapter(model, tmp_path / "ad")
    assert checkpoint_fingerprint(tmp_path / "base", 2) == zflora.adapter_io.base_fingerprint(model)
    serve_command(str(tmp_path / "base"), str(tmp_path / "ad"), [])  # its own base: accepted
    with pytest.raises(AdapterError, match="weights of embed_tokens differ"):
        serve_command(str(tmp_path / "other"), str(tmp_path / "ad"), [])
    with pytest.raises(AdapterError, match="weights of embed_tokens differ"):  # what load_adapter says too
        zflora.load_adapter(zflora.models.load_local_model(tmp_path / "other"), tmp_path / "ad")
