"""The quantized ONNX graph: every MatMul / Gemm with a constant weight (the decoder's projections and the
LM head) becomes ONNX Runtime's `MatMulNBits` (`zflora.quantization` says how weights are quantized).

A fused zFLoRA projection's base and adapter block are quantized apart and joined by a `Concat` (axis 0
of the packed weight and scales for an output projection, axis 1 for an input projection), which ONNX
Runtime folds into one constant weight at session creation: one matmul per projection, and an adapter
swap rewrites only the adapter's packed bytes and scales. Pure adapter weights (zFLoRA-MHA's embedding
projection `A_in`) stay fp32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..quantization import Quantization, block_quantize

# --------------------------------------------------------------------------- the graph pass


def quantize_graph(proto: Any, adapter_names: set[str], q: Quantization, strip: str = "model.") -> dict[str, Any]:
    """Replace every MatMul / Gemm with a constant weight in `proto` (loaded with its data) by a
    `MatMulNBits`, in place. `adapter_names`: the adapter blocks' parameter names (initializer names
    without `strip`). Returns, for each new adapter initializer, {"parameter", "part", "kind"}."""
    import onnx

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for name in [i for n in graph.node for i in n.input] + [o.name for o in graph.output]:
        consumers[name] = consumers.get(name, 0) + 1

    new_nodes, added, dead, layout = [], [], set(), {}
    for node in graph.node:
        plan = _weight_of(node, inits, producer)
        parts = [] if plan is None else plan["parts"]
        adapters = {p: p.removeprefix(strip) for p in parts if p.removeprefix(strip) in adapter_names}
        if plan is None or len(adapters) == len(parts):  # pure adapter weights stay fp32
            new_nodes.append(node)
            continue
        nodes, tensors, entries = _matmul_nbits(node, plan, q, adapters)
        new_nodes += nodes
        added += tensors
        layout.update(entries)
        for i in node.input[1:]:
            consumers[i] -= 1
        dead.update(plan["nodes"])
    del graph.node[:]
    graph.node.extend(_without_dead(new_nodes, dead, consumers))
    used = {i for n in graph.node for i in n.input}
    remaining = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(remaining + added)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return layout


def _matmul_nbits(node: Any, plan: dict[str, Any], q: Quantization,
                  adapters: dict[str, str]) -> tuple[list[Any], list[Any], dict[str, Any]]:  # fmt: skip
    """The nodes, initializers and adapter layout entries that replace `node`, whose weight `plan` describes:
    each part quantized apart, two parts joined by a `Concat` of the packed bytes and of the scales.
    `adapters`: the adapter parts, initializer name -> parameter name."""
    from onnx import helper, numpy_helper

    parts, axis = plan["parts"], plan["axis"]
    if len(parts) == 2 and axis == 1 and (kb := plan["k_base"]) % q.block_size:
        raise ValueError(f"{node.name}: the base weight's K = {kb} is not a multiple of block_size "
                         f"{q.block_size}, so the adapter's columns would share blocks with it; "
                         f"choose a block size that divides {kb}")  # fmt: skip
    tensors, packed_names, scale_names, layout = [], [], [], {}
    for name, w in zip(parts, plan["weights_kn"], strict=True):
        packed, scales = block_quantize(w, q)
        pn, sn = f"{name}_Q{q.bits}", f"{name}_scales"
        tensors += [numpy_helper.from_array(packed, pn), numpy_helper.from_array(scales, sn)]
        packed_names.append(pn)
        scale_names.append(sn)
        if name in adapters:
            kind = "in" if axis == 1 else "out"
            layout[pn] = {"parameter": adapters[name], "part": "packed", "kind": kind}
            layout[sn] = {"parameter": adapters[name], "part": "scales", "kind": kind}
    nodes = []
    if len(parts) == 2:
        base = node.name or parts[0]
        nodes += [helper.make_node("Concat", packed_names, [f"{base}_Q{q.bits}_joined"], axis=axis,
                                   name=f"{base}_Q{q.bits}_join"),
                  helper.make_node("Concat", scale_names, [f"{base}_scales_joined"], axis=axis,
                                   name=f"{base}_scales_join")]  # fmt: skip
        packed_names, scale_names = [f"{base}_Q{q.bits}_joined"], [f"{base}_scales_joined"]
    attrs = {"K": plan["k"], "N": plan["n"], "bits": q.bits, "block_size": q.block_size}
    if q.accuracy_level:
        attrs["accuracy_level"] = q.accuracy_level
    nodes.append(helper.make_node("MatMulNBits", [node.input[0], packed_names[0], scale_names[0]],
                                  list(node.output), name=f"{node.name}_Q{q.bits}", domain="com.microsoft",
                                  **attrs))  # fmt: skip
    return nodes, tensors, layout


def _without_dead(nodes: list[Any], dead: set[str], consumers: dict[str, int]) -> list[Any]:
    """`nodes` less the Transpose / Concat nodes in `dead` that fed a replaced weight, once nothing reads
    them (walked last first, so a chain of them goes together). Updates `consumers`."""
    keep = []
    for node in reversed(nodes):
        if node.name in dead and all(consumers.get(o, 0) == 0 for o in node.output):
            for i in node.input:
                consumers[i] -= 1
            continue
        keep.append(node)
    keep.reverse()
    return keep


def _weight_of(node: Any, inits: dict[str, Any], producer: dict[str, Any]) -> dict[str, Any] | None:
    """The constant weight of a MatMul (through a Transpose, of an initializer or of a Concat of two) or of
    a Gemm without bias: its parts' names, each part as (K, N) fp32, the Concat axis in (out, in) layout."""
    from onnx import helper, numpy_helper

    if node.op_type == "Gemm":
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if len(node.input) > 2 or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0:
            return None
        name = node.input[1]
        if name not in inits:
            return None
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        return _whole(name, w.T if a.get("transB", 0) else w, [])
    if node.op_type != "MatMul":
        return None
    src, chain = node.input[1], []
    transposed = False
    if src in producer and producer[src].op_type == "Transpose":
        t = producer[src]
        perm = [list(x.ints) for x in t.attribute if x.name == "perm"]
        if perm and perm[0] != [1, 0]:
            return None
        transposed, chain, src = True, [t.name], t.input[0]
    if src in inits:
        w = numpy_helper.to_array(inits[src]).astype(np.float32)
        if w.ndim != 2:
            return None
        return _whole(src, w.T if transposed else w, chain)
    if not transposed or src not in producer or producer[src].op_type != "Concat":
        return None
    cat = producer[src]
    if len(cat.input) != 2 or not all(i in inits for i in cat.input):
        return None
    axis = next(helper.get_attribute_value(x) for x in cat.attribute if x.name == "axis")
    base, block = (numpy_helper.to_array(inits[i]).astype(np.float32) for i in cat.input)
    if base.ndim != 2 or block.ndim != 2:
        return None
    axis = axis % 2  # (out, in) layout: 1 extends K (input projection), 0 extends N (output projection)
    k = base.shape[1] + (block.shape[1] if axis == 1 else 0)
    n = base.shape[0] + (block.shape[0] if axis == 0 else 0)
    return {"parts": list(cat.input), "weights_kn": [base.T, block.T], "axis": axis, "k": k, "n": n,
            "k_base": base.shape[1], "nodes": [*chain, cat.name]}  # fmt: skip


def _whole(name: str, w_kn: np.ndarray, nodes: list[str]) -> dict[str, Any]:
    """The plan of a weight that is one initializer (no adapter block beside it)."""
    k, n = w_kn.shape
    return {"parts": [name], "weights_kn": [w_kn], "axis": None, "k": k, "n": n, "k_base": k, "nodes": nodes}
