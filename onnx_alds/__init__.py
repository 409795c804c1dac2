"""onnx-alds: low-rank compression of ONNX models with ALDS."""

from .api import apply_plan, inspect, rewrite
from .plan import LayerPlan, Plan
from .report import Report

__all__ = ["rewrite", "apply_plan", "inspect", "Plan", "LayerPlan", "Report"]
__version__ = "0.1.0"
