"""onnx-alds: low-rank compression of ONNX models with ALDS.

The names below load lazily, so that ``onnx-alds`` (``cli.main``) can start
handling Ctrl-C before the heavy modules are imported."""

__all__ = ["rewrite", "apply_plan", "inspect", "Plan", "LayerPlan", "Report"]
__version__ = "0.1.0"

_WHERE = {"rewrite": "api", "apply_plan": "api", "inspect": "api", "Plan": "plan", "LayerPlan": "plan",
          "Report": "report"}


def __getattr__(name):
    import importlib
    import importlib.util

    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: onnx_alds.io, ...
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
