"""Replace a layer by its factorized subgraph (onnx-graphsurgeon).

Conv ``W (f×c×κ1×κ2)`` with configuration ``(k, scheme, j)`` becomes

    x ─ Conv(encoder, group=k, k·j outputs) ─ Conv(decoder, f outputs, + bias) ─ y

where each kernel axis, with its stride, dilation and (possibly asymmetric)
pads, goes to the conv that holds it in the scheme (s0: both in the encoder,
s3: both in the decoder, s1: axis 1 in the decoder and axis 2 in the encoder,
s2: the other way round).  The encoder has no bias and no padding along the
axes it does not hold, so zero padding commutes with it and the result equals
the original convolution exactly at full rank.  A conv with
``auto_pad=SAME_UPPER/SAME_LOWER`` keeps it on both convs (an axis a conv does
not hold has kernel 1 and stride 1 there, so it gets no padding), which stays
exact at every input size.

A linear layer (Gemm ``transA=0`` / MatMul with a constant weight) becomes a
grouped linear from plain ops, never a block-diagonal dense matrix:

    x (…, c) ─ Reshape (…, k, c/k) ─ Transpose (k, …, c/k) ─ MatMul (k, c/k, j)
             ─ Transpose (…, k, j) ─ Reshape (…, k·j) ─ Gemm/MatMul (k·j → f) ─ y

(with k = 1 simply ``MatMul (c, j)`` then the decoder).  Gemm keeps its ``C``
and ``beta`` on the decoder Gemm; ``alpha`` is folded into the weights.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .extract import Layer
from .factorize import factorize

# which conv (encoder or decoder) holds each kernel axis
_AXIS_OWNER = {"s0": ("enc", "enc"), "s1": ("dec", "enc"), "s2": ("enc", "dec"), "s3": ("dec", "dec")}


def _conv_attrs(layer: Layer, kernel: tuple[int, int], owner: tuple[str, str], me: str, group: int) -> dict:
    nsp = layer.spatial_rank
    strides, dil, pads_b, pads_e, ks = [], [], [], [], []
    for a in range(nsp):
        mine = owner[a] == me
        ks.append(kernel[a])
        strides.append(layer.strides[a] if mine else 1)
        dil.append(layer.dilations[a] if mine else 1)
        pads_b.append(layer.pads[a] if mine else 0)
        pads_e.append(layer.pads[2 + a] if mine else 0)
    if layer.auto_pad in ("SAME_UPPER", "SAME_LOWER"):  # stays exact when the input size changes
        return {"kernel_shape": ks, "strides": strides, "dilations": dil, "auto_pad": layer.auto_pad, "group": group}
    return {"kernel_shape": ks, "strides": strides, "dilations": dil, "pads": pads_b + pads_e, "group": group}


def _emit_conv(layer: Layer, k: int, scheme: str, rank: int, weights=None) -> list[gs.Node]:
    node = layer.node
    enc_w, dec_w = weights if weights is not None else factorize(layer.weight4(), scheme, k, rank)
    if layer.spatial_rank == 1:
        enc_w, dec_w = enc_w[..., 0], dec_w[..., 0]
    owner = _AXIS_OWNER[scheme]
    if layer.spatial_rank == 1:
        owner = owner[:1]
    p = layer.name
    z = gs.Variable(f"{p}/alds_encoder_output", dtype=node.outputs[0].dtype)
    enc = gs.Node("Conv", name=f"{p}/alds_encoder",
                  attrs=_conv_attrs(layer, enc_w.shape[2:], owner, "enc", k),
                  inputs=[node.inputs[0], gs.Constant(f"{p}/alds_encoder.weight", enc_w)], outputs=[z])
    dec_inputs = [z, gs.Constant(f"{p}/alds_decoder.weight", dec_w)]
    if len(node.inputs) > 2 and node.inputs[2].name:
        dec_inputs.append(node.inputs[2])
    dec = gs.Node("Conv", name=f"{p}/alds_decoder",
                  attrs=_conv_attrs(layer, dec_w.shape[2:], owner, "dec", 1),
                  inputs=dec_inputs, outputs=list(node.outputs))
    return [enc, dec]


def _const_i64(name: str, values) -> gs.Constant:
    return gs.Constant(name, np.asarray(values, dtype=np.int64))


def _emit_linear(layer: Layer, k: int, scheme: str, rank: int, weights=None) -> list[gs.Node]:
    node = layer.node
    p = layer.name
    # linear layers have one folding
    enc_w, dec_w = weights if weights is not None else factorize(layer.weight4(), "s0", k, rank)
    f, c = layer.geometry.f, layer.geometry.c
    enc_w = enc_w.reshape(k, rank, c // k)  # (k, j, cg)
    dec_w = dec_w.reshape(f, k * rank)  # (f, k·j)
    dtype = node.outputs[0].dtype
    x = node.inputs[0]
    nodes: list[gs.Node] = []

    def var(suffix):
        return gs.Variable(f"{p}/alds_{suffix}", dtype=dtype)

    if k == 1:
        z = var("encoder_output")
        nodes.append(gs.Node("MatMul", name=f"{p}/alds_encoder",
                             inputs=[x, gs.Constant(f"{p}/alds_encoder.weight", np.ascontiguousarray(enc_w[0].T))],
                             outputs=[z]))
    else:
        r = layer.activation_rank
        cg = c // k
        xs, xt, zt, zs, z = (var(s) for s in ("split", "groups_first", "encoded", "groups_last", "encoder_output"))
        gw = np.ascontiguousarray(enc_w.transpose(0, 2, 1)).reshape((k,) + (1,) * (r - 2) + (cg, rank))
        nodes += [
            gs.Node("Reshape", name=f"{p}/alds_split", outputs=[xs],
                    inputs=[x, _const_i64(f"{p}/alds_split.shape", [0] * (r - 1) + [k, cg])]),
            gs.Node("Transpose", name=f"{p}/alds_groups_first", inputs=[xs], outputs=[xt],
                    attrs={"perm": [r - 1] + list(range(r - 1)) + [r]}),
            gs.Node("MatMul", name=f"{p}/alds_encoder", outputs=[zt],
                    inputs=[xt, gs.Constant(f"{p}/alds_encoder.weight", gw)]),
            gs.Node("Transpose", name=f"{p}/alds_groups_last", inputs=[zt], outputs=[zs],
                    attrs={"perm": list(range(1, r)) + [0, r]}),
            gs.Node("Reshape", name=f"{p}/alds_merge", outputs=[z],
                    inputs=[zs, _const_i64(f"{p}/alds_merge.shape", [0] * (r - 1) + [k * rank])]),
        ]
    if layer.op == "Gemm":
        inputs = [z, gs.Constant(f"{p}/alds_decoder.weight", dec_w)]
        if len(node.inputs) > 2 and node.inputs[2].name:
            inputs.append(node.inputs[2])
        nodes.append(gs.Node("Gemm", name=f"{p}/alds_decoder", inputs=inputs, outputs=list(node.outputs),
                             attrs={"alpha": 1.0, "beta": layer.beta, "transA": 0, "transB": 1}))
    else:
        nodes.append(gs.Node("MatMul", name=f"{p}/alds_decoder", outputs=list(node.outputs),
                             inputs=[z, gs.Constant(f"{p}/alds_decoder.weight", np.ascontiguousarray(dec_w.T))]))
    return nodes


def replacement(layer: Layer, k: int, scheme: str, rank: int, weights=None) -> list[gs.Node]:
    """The nodes that compute ``layer`` factorized as ``(k, scheme, rank)``;
    ``weights`` = (encoder, decoder) conv weights as :func:`factorize` returns
    them, computed from the layer's weight when not given."""
    if layer.op == "Conv":
        return _emit_conv(layer, k, scheme, rank, weights)
    return _emit_linear(layer, k, scheme, rank, weights)


def apply_replacements(graph: gs.Graph, replaced: dict[int, list[gs.Node]]) -> None:
    """Put each node's replacement where the node stood (so the graph stays
    topologically sorted and untouched nodes keep their order), then drop
    Constant nodes whose output no longer has a consumer."""
    new_nodes = []
    for node in graph.nodes:
        if id(node) in replaced:
            node.outputs.clear()  # disconnect, so producers forget this consumer
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            node.inputs.clear()
            new_nodes.extend(replaced[id(node)])
            if isinstance(weight, gs.Variable) and not weight.outputs and len(weight.inputs) == 1 \
                    and weight.inputs[0].op == "Constant":
                weight.inputs[0].outputs.clear()
        else:
            new_nodes.append(node)
    graph.nodes = [n for n in new_nodes if not (n.op == "Constant" and not n.outputs)]


def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def subgraph_bodies(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The If/Loop/Scan nodes of ``graph``."""
    return [n for n in graph.node if any(_subgraphs(n))]


def names_read_inside(nodes) -> set[str]:
    """Every tensor name read anywhere inside the bodies of ``nodes`` (nested ones too)."""
    read: set[str] = set()
    stack = [g for n in nodes for g in _subgraphs(n)]
    while stack:
        g = stack.pop()
        for n in g.node:
            read.update(n.input)
            stack.extend(_subgraphs(n))
    return read


def restore_subgraphs(original: onnx.ModelProto, new: onnx.ModelProto) -> None:
    """Give the If/Loop/Scan nodes of ``new`` (exported by graphsurgeon from
    ``original`` after main-graph replacements) their original bodies back.

    Only main-graph layers are rewritten, so the bodies are unchanged; but
    graphsurgeon exports every outer-scope initializer a body reads as an
    initializer of that body (once per body that reads it), which duplicates
    weights.  The main-graph initializers the bodies read stay in the main
    graph."""
    by_outputs = {tuple(n.output): n for n in subgraph_bodies(original.graph)}
    if not by_outputs:
        return
    restored = []
    for node in new.graph.node:
        orig = by_outputs.get(tuple(node.output))
        if orig is None or not any(_subgraphs(node)):
            continue
        del node.attribute[:]
        node.attribute.extend(orig.attribute)
        restored.append(node)
    read = names_read_inside(restored)
    defined = {t.name for t in new.graph.initializer} | {i.name for i in new.graph.input}
    defined |= {o for n in new.graph.node for o in n.output}
    new.graph.initializer.extend(t for t in original.graph.initializer if t.name in read and t.name not in defined)
