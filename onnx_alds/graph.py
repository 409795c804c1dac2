"""Graph walks shared by the loader and the emitter: the bodies of If/Loop/Scan nodes and the
outer tensors they read (which must survive a rewrite and a large model's detaching)."""

from __future__ import annotations

import onnx


def subgraphs(node: onnx.NodeProto):
    """The graphs held in a node's attributes (an If's branches, a Loop's or Scan's body)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def subgraph_bodies(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The If/Loop/Scan nodes of ``graph``."""
    return [n for n in graph.node if any(subgraphs(n))]


def names_read_inside(nodes) -> set[str]:
    """Every tensor name read anywhere inside the bodies of ``nodes`` (nested ones too)."""
    read: set[str] = set()
    stack = [g for n in nodes for g in subgraphs(n)]
    while stack:
        g = stack.pop()
        for n in g.node:
            read.update(n.input)
            stack.extend(subgraphs(n))
    return read
