"""Emission: replace each chosen layer by its factorized subgraph
(onnx-graphsurgeon), keeping everything else of the model as it was.

What the subgraph of an operator is belongs to its spec
(:mod:`onnx_alds.ops`); this module puts the replacements where the nodes
stood, gives every new tensor and node a name that is fresh against every
name of the model (subgraphs and functions included), and exports the graph
with the original model's IR version, opsets, metadata and bodies.
"""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs

from .graph import names_read_inside, subgraph_bodies, subgraphs
from .io import Source, copy_model_fields

log = logging.getLogger(__name__)


class Names:
    """Fresh names: a wanted name is used as is unless the model (or an
    earlier emission) already has it, then ``name_1``, ``name_2``, ...
    Tensors (:meth:`fresh`) and nodes (:meth:`node`) have separate namespaces,
    as in ONNX."""

    def __init__(self, taken: set[str], nodes: set[str] | None = None):
        self.taken = set(taken)
        self.nodes = set(nodes or ())

    @classmethod
    def of_model(cls, model: onnx.ModelProto, graph: gs.Graph | None = None) -> "Names":
        taken: set[str] = set()
        nodes: set[str] = set()
        for fn in model.functions:
            taken.update(fn.input)
            taken.update(fn.output)
        stack = [model.graph] + [n for fn in model.functions for n in fn.node]
        while stack:
            item = stack.pop()
            if isinstance(item, onnx.GraphProto):
                taken.update(v.name for v in list(item.input) + list(item.output) + list(item.value_info))
                taken.update(t.name for t in item.initializer)
                stack.extend(item.node)
            else:  # a node
                nodes.add(item.name)
                taken.update(item.input)
                taken.update(item.output)
                stack.extend(subgraphs(item))
        if graph is not None:  # a detached large model: its tensors live in the graph only
            taken.update(graph.tensors().keys())
            nodes.update(n.name for n in graph.nodes)
        taken.discard("")
        return cls(taken, nodes)

    @staticmethod
    def _take(pool: set[str], want: str) -> str:
        name, i = want, 0
        while name in pool:
            i += 1
            name = f"{want}_{i}"
        pool.add(name)
        return name

    def fresh(self, want: str) -> str:
        """A tensor name."""
        return self._take(self.taken, want)

    def node(self, want: str) -> str:
        """A node name."""
        return self._take(self.nodes, want)


def replacement(layer, node: gs.Node, cfg, factors, names: Names) -> list[gs.Node]:
    """The nodes that compute ``layer`` factorized as ``cfg`` with ``factors``."""
    return layer.spec.emit(layer, node, cfg, factors, names)


def emit(source: Source, info, choices: dict, factors: dict, *, progress: bool = False) -> onnx.ModelProto:
    """Replace the chosen layers (``choices[name]`` a Config, ``factors[name]``
    its :class:`~onnx_alds.ops.Factors`) and export."""
    from .progress import progress_iter

    names = Names.of_model(source.model, source.graph)
    replaced = {}
    chosen = [l for l in info.candidates if choices.get(l.name) is not None]
    for l in progress_iter(chosen, desc="emit", unit="layer", enabled=progress):
        node = source.node(l)
        replaced[id(node)] = replacement(l, node, choices[l.name], factors[l.name], names)
        # the original weight leaves the graph (it has no other reader): free it now, so
        # that the factors of later layers do not pile up on top of every original
        source.release(l)
    apply_replacements(source.graph, replaced)
    new = gs.export_onnx(source.graph, do_type_check=False)
    restoresubgraphs(source.model, new)
    copy_model_fields(source.model, new)
    if not new.functions and source.model.functions:
        new.functions.extend(source.model.functions)
    keep_untouched(source.model, new)
    if new.ir_version < 4:
        initializers_as_inputs(new)
    return new


def keep_untouched(original: onnx.ModelProto, new: onnx.ModelProto) -> None:
    """What the rewrite does not touch stays: the graph inputs' and outputs' types and shapes,
    initializers no node reads (graphsurgeon's export drops them) and the order of the graph inputs.
    ``training_info`` refers to the original weights, so it cannot stay;
    :func:`dropped` lists it for the report."""
    # the interface keeps its types and shapes: graphsurgeon lets a shapeless value_info entry of an
    # output's name replace the output's shape (ddddocr's models), which the strict check then refuses
    declared = {v.name: v for v in list(original.graph.input) + list(original.graph.output)}
    for v in list(new.graph.input) + list(new.graph.output):
        if v.name in declared and v.type != declared[v.name].type:
            v.type.CopyFrom(declared[v.name].type)
    have = {t.name for t in new.graph.initializer}
    read = {i for n in original.graph.node for i in n.input} | {o.name for o in original.graph.output}
    read |= names_read_inside(subgraph_bodies(original.graph))
    new.graph.initializer.extend(t for t in original.graph.initializer if t.name not in read and t.name not in have)
    # graph inputs that are also initializers (overridable weights) keep their place in the interface
    have = {t.name for t in new.graph.initializer}
    by_name = {i.name: i for i in new.graph.input}
    if any(i.name not in by_name and i.name in have for i in original.graph.input):
        order = [by_name.get(i.name) or (i if i.name in have else None) for i in original.graph.input]
        rest = [i for i in new.graph.input if i.name not in {o.name for o in original.graph.input}]
        del new.graph.input[:]
        new.graph.input.extend([i for i in order if i is not None] + rest)


def dropped(original: onnx.ModelProto) -> list[str]:
    """Parts of the input model that the rewritten model cannot carry."""
    out = []
    if len(original.training_info):
        out.append(f"training_info ({len(original.training_info)} entries): its algorithms refer to the "
                   f"original weights")
    return out


def initializers_as_inputs(model: onnx.ModelProto) -> None:
    """IR version 3 wants every initializer listed as a graph input too."""
    inputs = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        if t.name not in inputs:
            model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


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


def restoresubgraphs(original: onnx.ModelProto, new: onnx.ModelProto) -> None:
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
        if orig is None or not any(subgraphs(node)):
            continue
        del node.attribute[:]
        node.attribute.extend(orig.attribute)
        restored.append(node)
    read = names_read_inside(restored)
    defined = {t.name for t in new.graph.initializer} | {i.name for i in new.graph.input}
    defined |= {o for n in new.graph.node for o in n.output}
    new.graph.initializer.extend(t for t in original.graph.initializer if t.name in read and t.name not in defined)
