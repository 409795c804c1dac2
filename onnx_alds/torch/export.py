"""Export a PyTorch module to ONNX with BatchNorm folded and weights named after modules.

The exporter is torch's ``torch.export``-based one (``dynamo=True``); the legacy
TorchScript exporter is deprecated since torch 2.9 and names BN-folded weights
``onnx::Conv_NNN``. The exported graph has a dynamic batch dimension (``batch``)
on every input and output.

Naming contract (what the ONNX side and ``onnx_alds.torch.apply_plan`` rely on):

* every Conv / Gemm / MatMul node whose weight is a module parameter reads an
  initializer named ``<module path>.weight`` (``layer1.0.conv1.weight``) and,
  where it has one, ``<module path>.bias``; the node itself is named
  ``<module path>`` (``layer1.0.conv1``);
* the stored orientation is the exporter's: Conv ``f x c x k1 x k2``, Gemm
  ``f x c`` with ``transB=1``, MatMul ``c x f`` (the transpose of
  ``nn.Linear.weight``). A Linear applied to a 3-D input becomes
  ``MatMul`` + ``Add`` (bias); the Add's bias initializer is named
  ``<module path>.bias`` too;
* :func:`weight_to_module` maps such a name back to the module.

BatchNorm that directly follows a Conv/Linear (and whose input is nothing but
that layer's output) is folded into it in torch first, so the module returned by
:func:`fold_batchnorm` has exactly the weights the ONNX file holds.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..errors import UsageError, first_line
from ..io import EXTERNAL_DATA_THRESHOLD, proto_size, save_model
from .scratch import private_inductor_cache

__all__ = [
    "export",
    "export_from_factory",
    "fold_batchnorm",
    "load_factory",
    "weight_to_module",
]

log = logging.getLogger(__name__)

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LAYER_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
# torch.export-based exporter: opset 18+ (its version converter cannot go lower for ReduceMean & co.)
MIN_OPSET = 18


# ----------------------------------------------------------------------------
# BatchNorm folding
# ----------------------------------------------------------------------------


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise UsageError("example_inputs must be a tensor or a tuple of tensors.")


def _find_conv_bn_pairs(model: nn.Module, example_inputs: tuple) -> list[tuple[str, str]]:
    """(layer name, bn name) pairs where the BN's input is exactly the layer's output.

    Found by running the model once with hooks, so it works for any forward()
    (Sequential or hand-written blocks). Layers or BNs called more than once are
    left alone.
    """
    produced: dict[int, str] = {}  # id(output tensor) -> layer name
    keep_alive: list[torch.Tensor] = []  # so ids are not reused during the pass
    out_ndim: dict[str, int] = {}
    calls: dict[str, int] = defaultdict(int)
    fed_by: dict[str, str | None] = {}
    handles = []

    def layer_hook(name):
        def hook(_mod, _inp, out):
            calls[name] += 1
            if isinstance(out, torch.Tensor):
                produced[id(out)] = name
                keep_alive.append(out)
                out_ndim[name] = out.dim()

        return hook

    def bn_hook(name):
        def hook(_mod, inp):
            calls[name] += 1
            x = inp[0] if inp else None
            fed_by[name] = produced.get(id(x)) if isinstance(x, torch.Tensor) else None

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, _CONV_TYPES) or isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(layer_hook(name)))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            handles.append(mod.register_forward_pre_hook(bn_hook(name)))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()

    modules = dict(model.named_modules())
    pairs = []
    used_layers: set[str] = set()
    for bn_name, layer_name in fed_by.items():
        if layer_name is None or calls[bn_name] != 1 or calls[layer_name] != 1 or layer_name in used_layers:
            continue
        bn, layer = modules[bn_name], modules[layer_name]
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            continue
        if isinstance(layer, nn.Linear):
            # BatchNorm1d normalizes dim 1: only the same as Linear's features for (N, F) outputs
            if out_ndim.get(layer_name) != 2 or layer.out_features != bn.num_features:
                continue
        elif layer.out_channels != bn.num_features:
            continue
        pairs.append((layer_name, bn_name))
        used_layers.add(layer_name)
    return pairs


def _max_rel_diff(a: Any, b: Any) -> float:
    ta = [t for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
    tb = [t for t in (b if isinstance(b, (list, tuple)) else [b]) if isinstance(t, torch.Tensor)]
    worst = 0.0
    for x, y in zip(ta, tb):
        scale = float(x.abs().max()) or 1.0
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def _fuse_pairs(model: nn.Module, pairs: Sequence[tuple[str, str]]) -> nn.Module:
    fused = copy.deepcopy(model)
    for layer_name, bn_name in pairs:
        layer, bn = fused.get_submodule(layer_name), fused.get_submodule(bn_name)
        if isinstance(layer, nn.Linear):
            new = fuse_linear_bn_eval(layer, bn)
        else:
            # a transposed conv stores its output channels second: torch's fusion must be told
            new = fuse_conv_bn_eval(layer, bn, transpose=isinstance(layer, nn.modules.conv._ConvTransposeNd))
        fused.set_submodule(layer_name, new)
        fused.set_submodule(bn_name, nn.Identity())
    return fused


def fold_batchnorm(model: nn.Module, example_inputs: Any, *, rtol: float = 1e-4) -> nn.Module:
    """A copy of ``model`` in eval mode with every foldable BatchNorm folded into its Conv/Linear.

    A BN is folded when its input is exactly the output of a Conv or Linear that
    runs once (found by running ``example_inputs`` through the model with hooks);
    the folded BN becomes ``nn.Identity`` and the layer gains a bias. The result
    is checked against the original on ``example_inputs``; a fold that changes the
    output (e.g. the layer's output is also used elsewhere) is undone. The input
    model is not modified.
    """
    model = copy.deepcopy(model).eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example_inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in _as_tuple(example_inputs))
    pairs = _find_conv_bn_pairs(model, example_inputs)
    if not pairs:
        return model
    with torch.no_grad():
        ref = model(*example_inputs)
        fused = _fuse_pairs(model, pairs)
        if _max_rel_diff(ref, fused(*example_inputs)) <= rtol:
            log.debug("folded %d BatchNorm layers", len(pairs))
            return fused
        # find the offending folds one at a time
        good: list[tuple[str, str]] = []
        for pair in pairs:
            trial = _fuse_pairs(model, good + [pair])
            if _max_rel_diff(ref, trial(*example_inputs)) <= rtol:
                good.append(pair)
            else:
                log.warning("not folding %s into %s: it changes the model's output", pair[1], pair[0])
        return _fuse_pairs(model, good)


# ----------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------


def weight_to_module(model: nn.Module, weight_name: str) -> nn.Module:
    """The module that owns an exported weight: ``"layer1.0.conv1.weight"`` -> ``model.layer1.0.conv1``.

    Accepts ``.weight`` / ``.bias`` parameter names as written by :func:`export`,
    a bare module path, and torch.export's flattened placeholder names
    (``p_layer1_0_conv1_weight``). Raises :class:`UsageError` when nothing matches.
    """
    modules = dict(model.named_modules())
    name = weight_name
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix) and name[: -len(suffix)] in modules:
            return modules[name[: -len(suffix)]]
    if name in modules and name != "":
        return modules[name]
    # torch.export placeholder style: p_layer1_0_conv1_weight
    flat = name[2:] if name.startswith("p_") else name
    for suffix in ("_weight", "_bias"):
        if flat.endswith(suffix):
            stem = flat[: -len(suffix)]
            matches = [m for n, m in modules.items() if n and n.replace(".", "_") == stem]
            if len(matches) == 1:
                return matches[0]
    raise UsageError(f"no module of the model owns the weight {weight_name!r}")


def _module_from_scopes(node, layer_modules: dict[str, nn.Module]) -> str | None:
    text = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if text is None:
        return None
    import ast

    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    for scope in reversed(scopes):
        if scope in layer_modules:
            return scope
    return None


def _expected_weight(node, mod: nn.Module) -> np.ndarray:
    w = mod.weight.detach().cpu().numpy()
    if node.op_type == "MatMul":
        return w.T
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return w if trans_b is not None and trans_b.as_int() else w.T
    if node.op_type == "ConvTranspose":
        return w
    return w


def _rename_layers(model_ir, model: nn.Module) -> int:
    """Name each Conv/Gemm/MatMul/ConvTranspose weight (and bias) initializer and
    node after its module, on the exporter's own IR (onnx-ir), so that every
    use (subgraphs included) follows and value_info is written anew.

    The module is taken from the node's ``name_scopes`` metadata and confirmed by
    value; failing that, found by value among the model's Conv/Linear weights.
    Initializers that the exporter shared between layers (equal values) are
    copied so that each layer has its own. Returns how many layers were named."""
    import onnx_ir as ir

    graph = model_ir.graph
    layer_modules = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, _CONV_TYPES + (nn.Linear,)) and isinstance(getattr(m, "weight", None), torch.Tensor)
    }
    by_bytes: dict[tuple, list[str]] = defaultdict(list)
    for n, m in layer_modules.items():
        w = m.weight.detach().cpu().numpy()
        for arr in (w, w.T) if w.ndim == 2 else (w,):
            by_bytes[(arr.shape, np.ascontiguousarray(arr).tobytes())].append(n)
    taken_nodes = {n.name for n in graph}
    named = 0
    done_modules: set[str] = set()

    def give_name(node, idx: int, new_name: str) -> None:
        value = node.inputs[idx]
        if value is None or value.name == new_name:
            return
        if len(value.uses()) == 1 and new_name not in graph.initializers:
            value.name = new_name  # every reference follows: the IR holds objects, not strings
            return
        if new_name in graph.initializers:
            return  # already present under that name
        clone = ir.Value(name=new_name, type=value.type, shape=value.shape, const_value=value.const_value)
        graph.register_initializer(clone)  # a shared (deduplicated) initializer: this layer gets its own
        node.replace_input_with(idx, clone)

    for node in graph:
        if node.op_type not in _LAYER_OPS or len(node.inputs) < 2 or node.inputs[1] is None \
                or node.inputs[1].const_value is None or not node.inputs[1].is_initializer():
            continue
        w = node.inputs[1].const_value.numpy()
        mod_name = _module_from_scopes(node, layer_modules)
        if mod_name is not None and mod_name not in done_modules:
            exp = _expected_weight(node, layer_modules[mod_name])
            # a name the exporter already gave (e.g. after its own BN fusion) is trusted
            if node.inputs[1].name != f"{mod_name}.weight" and (exp.shape != w.shape or not np.array_equal(exp, w)):
                mod_name = None
        else:
            mod_name = None
        if mod_name is None:
            cands = [c for c in by_bytes.get((w.shape, np.ascontiguousarray(w).tobytes()), []) if c not in done_modules]
            if len(cands) != 1:
                continue
            mod_name = cands[0]
        done_modules.add(mod_name)
        give_name(node, 1, f"{mod_name}.weight")
        if node.op_type in ("Conv", "Gemm", "ConvTranspose") and len(node.inputs) > 2 \
                and node.inputs[2] is not None and node.inputs[2].is_initializer():
            give_name(node, 2, f"{mod_name}.bias")
        elif node.op_type == "MatMul":
            nxt = list(node.outputs[0].uses())
            if len(nxt) == 1 and nxt[0].node.op_type == "Add":
                add = nxt[0].node
                for j, inp in enumerate(add.inputs):
                    if inp is not None and inp.is_initializer() and inp is not node.outputs[0]:
                        give_name(add, j, f"{mod_name}.bias")
        if node.name != mod_name and mod_name not in taken_nodes:
            taken_nodes.discard(node.name)
            node.name = mod_name
            taken_nodes.add(mod_name)
        named += 1
    return named


# ----------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------


def export(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    fold_bn: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """Export ``model`` to ONNX at ``path`` (written atomically) and return the ModelProto.

    The model is copied and put in eval mode (the argument is not modified);
    with ``fold_bn`` BatchNorm is folded into the preceding Conv/Linear in torch
    (:func:`fold_batchnorm`). Dimension 0 of every input and output is a dynamic
    ``batch``. Weights are initializers named ``<module path>.weight`` (see the
    module docstring). Models whose weights exceed ~1.8 GB are written with
    external data in ``PATH.data``. ``opset`` defaults to the exporter's own
    (20 with torch 2.13); below 18 is a ``ValueError``.

    Note that torch's ONNX optimizer fuses a Conv+BatchNormalization pair it
    meets in the graph on its own, so ``fold_bn=False`` mainly matters for
    Linear+BatchNorm1d and for what the returned graph's BN-free Conv weights are
    compared with.
    """
    path = Path(path)
    if opset is not None and int(opset) < MIN_OPSET:
        raise UsageError(f"torch's ONNX exporter writes opset {MIN_OPSET} or newer, not opset {opset}.")
    model, trace_inputs = _prepared(model, example_inputs, fold_bn)
    if input_names is None:
        input_names = ["input"] if len(trace_inputs) == 1 else [f"input_{i}" for i in range(len(trace_inputs))]
    model_ir = _exported(model, trace_inputs, list(input_names), opset, output_names)
    got = model_ir.opset_imports.get("", model_ir.opset_imports.get("ai.onnx"))
    if opset is not None and got != int(opset):
        raise UsageError(f"torch's ONNX exporter could not write opset {opset} for this model (it wrote {got})")
    if output_names is None:
        _stable_output_names(model_ir)
    named = _rename_layers(model_ir, model)
    import onnx_ir as ir

    proto = ir.to_proto(model_ir)
    log.info("exported %s: %d nodes, %d layers named after modules", path, len(proto.graph.node), named)
    if proto_size(proto) < EXTERNAL_DATA_THRESHOLD:
        onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(proto, path)  # atomic; external data past the protobuf limit
    return proto


def _prepared(model: nn.Module, example_inputs, fold_bn: bool):
    """An eval-mode CPU copy of ``model`` (BatchNorm folded) and the inputs to trace it with."""
    example_inputs = _as_tuple(example_inputs)
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in example_inputs):
        raise UsageError("export needs example_inputs to be tensors with a batch dimension first.")
    model = copy.deepcopy(model).eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type != "cpu":
        model = model.cpu()
    example_inputs = tuple(t.detach().cpu() for t in example_inputs)
    if fold_bn:
        model = fold_batchnorm(model, example_inputs)
    # torch.export specializes a dimension that is 1 in the example: trace with batch 2
    return model, tuple(t if t.shape[0] != 1 else t.expand(2, *t.shape[1:]).contiguous() for t in example_inputs)


def _exported(model: nn.Module, trace_inputs: tuple, input_names: list, opset, output_names):
    """torch's dynamo exporter, batch dynamic on every input; returns its onnx_ir model."""
    batch = torch.export.Dim("batch")
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    if output_names is not None:
        kwargs["output_names"] = list(output_names)
    # torch logs a warning per torchvision op it cannot register when torchvision is absent
    reg_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    old_level = reg_log.level
    reg_log.setLevel(logging.ERROR)
    with warnings.catch_warnings(), private_inductor_cache():  # no $TMPDIR/torchinductor_<user> left behind
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # every input's axis 0 is the one batch: torch says it keeps one name for them, which is what we asked
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used", category=UserWarning)
        try:
            return torch.onnx.export(model, trace_inputs, dynamo=True, input_names=input_names,
                                     dynamic_shapes=tuple({0: batch} for _ in trace_inputs), external_data=False,
                                     verbose=False, **kwargs).model
        finally:
            reg_log.setLevel(old_level)


def _stable_output_names(model_ir) -> None:
    """The exporter names outputs after the last fx node: name them output / output_i instead."""
    outs = model_ir.graph.outputs
    names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
    taken = {v.name for n in model_ir.graph for v in list(n.inputs) + list(n.outputs) if v is not None}
    for out, new in zip(outs, names):
        if out.name != new and new not in taken:
            out.name = new


# ----------------------------------------------------------------------------
# factories (for `onnx-alds export`)
# ----------------------------------------------------------------------------


def factory_file(factory) -> Path | None:
    """The Python file that defines ``factory`` (``"path/to/file.py:callable"``,
    or a ``"module:callable"`` found on the path): an input, never to be
    overwritten.  None when it cannot be told without running code."""
    if not isinstance(factory, str) or ":" not in factory:
        return None
    target = factory.rpartition(":")[0]
    if target.endswith(".py") or os.sep in target or "/" in target:
        return Path(target)
    if "." in target:  # finding a submodule imports its package: leave that to load_factory
        return None
    try:
        spec = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and os.path.isfile(spec.origin) else None


def load_factory(factory: str):
    """Resolve ``"package.module:callable"`` or ``"path/to/file.py:callable"`` to the callable."""
    if not isinstance(factory, str) or factory.count(":") < 1:
        raise UsageError(f"Factory {factory!r} must look like 'package.module:callable' or 'path/to/file.py:callable'.")
    target, _, attr = factory.rpartition(":")
    if not target or not all(part.isidentifier() for part in attr.split(".")):
        raise UsageError(f"Factory {factory!r} must look like 'package.module:callable' or 'path/to/file.py:callable'.")
    if target.endswith(".py") or os.sep in target or "/" in target:
        file = Path(target)
        if not file.is_file():
            raise UsageError(f"Factory file {target} does not exist.")
        mod_name = f"_onnx_alds_factory_{abs(hash(str(file.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, file)
        if spec is None or spec.loader is None:
            raise UsageError(f"Factory file {target} cannot be imported as Python.")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        # let the file import its siblings
        sys.path.insert(0, str(file.resolve().parent))
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # the user's code failed: name it, it is not our bug
            sys.modules.pop(mod_name, None)
            raise UsageError(f"Factory file {target} cannot be imported: {type(e).__name__}: {e}.") from e
        finally:
            sys.path.remove(str(file.resolve().parent))
    else:
        # like other "module:callable" tools, look in the current directory too
        added = os.getcwd() not in sys.path and "" not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise UsageError(f"Factory module {target!r} cannot be imported: {e}.") from e
        except Exception as e:  # the user's module raised while importing
            raise UsageError(f"Factory module {target!r} cannot be imported: {type(e).__name__}: {e}.") from e
        finally:
            if added:
                sys.path.remove(os.getcwd())
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"Factory {factory!r} names {part!r}, which {target} does not define.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"Factory {factory!r} is not callable.")
    return obj


def _load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    ckpt_path = Path(checkpoint)
    if not ckpt_path.is_file():
        raise UsageError(f"Checkpoint {ckpt_path} does not exist.")
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors come in many types
        # not torch's text: it advises weights_only=False, which runs code from a hostile file
        raise UsageError(f"Checkpoint {ckpt_path} cannot be loaded as plain tensors ({type(e).__name__}); give a "
                         f"state dict saved with torch.save(model.state_dict(), path), which loads safely") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # finetune() checkpoints
    elif isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UsageError(f"Checkpoint {ckpt_path} holds no state dict.")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"Checkpoint {ckpt_path} does not fit the model: {first_line(e)}") from e


def export_from_factory(
    factory: str,
    out_path: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    input_shapes: Sequence[Sequence[int]],
    input_dtypes: Sequence[str] | None = None,
    opset: int | None = None,
    fold_bn: bool = True,
) -> onnx.ModelProto:
    """Build a model from ``factory`` (called with no arguments), load ``checkpoint``, export it.

    ``factory`` is ``"package.module:callable"`` or ``"path/to/file.py:callable"``;
    ``input_shapes`` gives one shape per model input, batch first, and
    ``input_dtypes`` their dtypes (:data:`EXAMPLE_DTYPES`; default float32):
    the example inputs are seeded random tensors of those shapes (normal for
    floats, 0 or 1 for integers and booleans: a valid token id and mask
    value for any vocabulary); batch stays dynamic. A model that fails on
    them is one sentence naming the shapes and dtypes. A checkpoint is
    a state dict or a :func:`onnx_alds.torch.finetune` checkpoint. Raises
    ``ValueError`` with one sentence for a bad factory string, a missing or
    unfitting checkpoint, or bad shapes.
    """
    if not input_shapes:
        raise UsageError("At least one input shape is needed to export a model.")
    shapes = []
    for s in input_shapes:
        try:
            shape = tuple(int(d) for d in s)
        except (TypeError, ValueError):
            raise UsageError(f"Input shape {s!r} must be a sequence of positive integers.") from None
        if not shape or any(d <= 0 for d in shape):
            raise UsageError(f"Input shape {s!r} must be a sequence of positive integers.")
        shapes.append(shape)
    fn = load_factory(factory)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UsageError(f"Checkpoint {checkpoint} does not exist.")
    try:
        model = fn()
    except TypeError as e:
        raise UsageError(f"Factory {factory!r} cannot be called without arguments: {e}.") from e
    except ImportError as e:  # a lazy import inside the user's factory
        raise UsageError(f"Factory {factory!r} failed on an import: {e}.") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"Factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module.")
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint)
    dtypes = list(input_dtypes) if input_dtypes is not None else ["float32"] * len(shapes)
    if len(dtypes) != len(shapes) or any(d not in EXAMPLE_DTYPES for d in dtypes):
        raise UsageError(f"input_dtypes must give one of {', '.join(EXAMPLE_DTYPES)} for each input shape")
    example = example_inputs(shapes, dtypes)
    try:
        with torch.no_grad():
            model.eval()(*example)
    except Exception as e:  # the user's forward on inputs it does not take: say what was fed
        fed = ", ".join(f"{','.join(map(str, s))}:{d}" for s, d in zip(shapes, dtypes))
        raise UsageError(f"the model fails on example inputs {fed} ({first_line(e)}); give each input's shape and "
                         f"dtype with --input-shape D1,D2,...:DTYPE (token ids are int64)") from None
    return export(model, example, out_path, opset=opset, fold_bn=fold_bn,
                  input_names=input_names_for(model, len(example)))


def input_names_for(model: nn.Module, n: int) -> list[str] | None:
    """The graph input names of a model of ``n`` inputs: its forward's parameter names where it has
    several (None: ``export``'s default, ``input`` for one)."""
    names = forward_params(model)
    return names[:n] if len(names) >= n > 1 else None


def forward_params(model: nn.Module) -> list[str]:
    """The names of ``model.forward``'s positional parameters (none for ``*args``): what a model of
    several inputs calls them (``input_ids``, ``attention_mask``)."""
    import inspect

    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


EXAMPLE_DTYPES = ("float32", "float16", "int64", "int32", "bool")


def example_inputs(shapes: Sequence[tuple], dtypes: Sequence[str]) -> tuple:
    """Seeded example tensors (a fixed random batch: zeros would make BN folding's output check
    meaningless): normal for floats, 0 or 1 for integers and booleans."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for s, d in zip(shapes, dtypes):
        if d.startswith("float"):
            out.append(torch.randn(s, generator=gen).to(getattr(torch, d)))
        else:
            out.append(torch.randint(0, 2, s, generator=gen).to(getattr(torch, d)))
    return tuple(out)
