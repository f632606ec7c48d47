"""`ZFLoRALlamaForCausalLM`: vLLM's own LLaMA layers, run on a d + r residual stream.

The decoder layers are vLLM's `LlamaDecoderLayer`, built from a copy of the
model config whose `hidden_size` is d + r (with `head_dim` pinned, so attention
is unchanged; r includes the zero channels of `hf_overrides(..., pad_to=N)`).
That makes every projection the fused zFLoRA one with vLLM's own parallel
layers, so tensor parallelism works as for LLaMA:

    qkv_proj      QKVParallelLinear(d + r -> q, k, v)        [W | s B] per shard
    gate_up_proj  MergedColumnParallelLinear(d + r -> 2 I)   [W | s B] per shard
    o_proj        RowParallelLinear(H hd -> d + r)           [W ; A]
    down_proj     RowParallelLinear(I -> d + r)              [W ; A]
    norms         RMSNorm(d + r, var_hidden_size=d)          gain [g ; 1], statistic of h only

vLLM's RMSNorm already takes its statistic over the first `var_hidden_size`
channels, fused residual add included. Once per forward the embedding output is
expanded to [h ; A_in h] and, at the end, the LM head reads h (or, when the
adapter adapts it, [h ; z] with [W | s B]). The fused weights are made while
the base checkpoint streams in (`zflora.serve.checkpoint.fuse_state_dict`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import make_empty_intermediate_tensors_factory, maybe_prefix

from ..config import ZFLoRAConfig
from ..fusion import padding
from ..models import head_dim
from . import ADAPTER_FIELD, ARCHITECTURE, PAD_FIELD, read_for_config, read_once
from .checkpoint import fuse_state_dict


def _zflora_config(hf_config: Any) -> ZFLoRAConfig:
    path = getattr(hf_config, ADAPTER_FIELD, None)
    if not path:
        raise ValueError(
            f"{ARCHITECTURE} needs the adapter directory in the config override {ADAPTER_FIELD!r}: "
            "pass hf_overrides=zflora.serve.hf_overrides(ADAPTER, BASE) to vllm.LLM, or use `zflora serve`"
        )
    return read_once(str(path)).config  # every decoder layer asks while the model is built


def _width(hf_config: Any) -> int:
    """The channels the stream carries after h: the adapter's r and any zero padding (`PAD_FIELD`)."""
    r = _zflora_config(hf_config).r
    return r + padding(hf_config.hidden_size, r, getattr(hf_config, PAD_FIELD, None))


def _stream_norm(hf_config: Any, r: int) -> RMSNorm:
    d = hf_config.hidden_size
    return RMSNorm(d + r, eps=hf_config.rms_norm_eps, var_hidden_size=d)


class ZFLoRADecoderLayer(LlamaDecoderLayer):
    def __init__(
        self,
        vllm_config: VllmConfig,
        prefix: str = "",
        config: Any = None,
        attn_layer_type: type[nn.Module] = LlamaAttention,
    ) -> None:
        base = config or vllm_config.model_config.hf_config
        r = _width(base)
        stream = copy.deepcopy(base)
        stream.head_dim = head_dim(base)
        stream.hidden_size = base.hidden_size + r
        super().__init__(vllm_config, prefix, config=stream, attn_layer_type=attn_layer_type)
        self.input_layernorm = _stream_norm(base, r)
        self.post_attention_layernorm = _stream_norm(base, r)


class ZFLoRALlamaModel(LlamaModel):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module] = ZFLoRADecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        config = vllm_config.model_config.hf_config
        zcfg = _zflora_config(config)
        self.d, self.r, self.lm_head_reads_z = config.hidden_size, _width(config), zcfg.lm_head  # r: with padding
        if get_pp_group().is_last_rank:
            self.norm = _stream_norm(config, self.r)
        self.zflora_A_in = nn.Parameter(torch.empty(self.r, self.d), requires_grad=False) if zcfg.expand_input else None
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], self.d + self.r
        )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **extra_layer_kwargs: Any,
    ) -> Any:
        if get_pp_group().is_first_rank:  # input expansion: [h0 ; A_in h0]
            h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            z = h.new_zeros(*h.shape[:-1], self.r) if self.zflora_A_in is None else F.linear(h, self.zflora_A_in)
            inputs_embeds = torch.cat([h, z], dim=-1)
        out = super().forward(None, positions, intermediate_tensors, inputs_embeds, **extra_layer_kwargs)
        if isinstance(out, torch.Tensor) and not self.lm_head_reads_z:
            return out[..., : self.d]  # output merge: the LM head reads h
        return out


class ZFLoRALlamaForCausalLM(LlamaForCausalLM):
    """A LLaMA base checkpoint served with a zFLoRA adapter, fused at load time."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module] = ZFLoRADecoderLayer):
        config = vllm_config.model_config.hf_config
        if vllm_config.quant_config is not None:
            raise ValueError(f"{ARCHITECTURE}: quantized base checkpoints are not supported (the fused weights)")
        _zflora_config(config)  # a clear error when the override is missing
        adapter = read_for_config(config, getattr(config, ADAPTER_FIELD))
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self.zflora_adapter = adapter  # read and checked once; dropped after loading
        if adapter.config.lm_head and get_pp_group().is_last_rank:
            # The head reads [h ; z] with [W | s B]: its own weight even when the base ties it.
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size + _width(config), prefix=maybe_prefix(prefix, "lm_head")
            )

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module] = ZFLoRADecoderLayer):
        return ZFLoRALlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        pad = _width(self.config) - self.zflora_adapter.config.r
        fused = fuse_state_dict(weights, self.zflora_adapter, bool(self.config.tie_word_embeddings), pad)
        loaded = super().load_weights(fused)
        self.zflora_adapter = None
        return loaded
