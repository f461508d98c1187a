"""Tracing, layer selection and rewrite passes."""
from .passes import PassContext, PassManager, SwapPass, candidates_in_order, refresh_report, replace_module
from .rules import Decision, LayerSelector
from .trace import TraceResult, trace

__all__ = ["trace", "TraceResult", "LayerSelector", "Decision", "PassContext", "PassManager", "SwapPass",
           "replace_module", "candidates_in_order", "refresh_report"]
