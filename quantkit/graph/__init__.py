"""Tracing, layer selection and rewrite passes (every pass of every scheme lives here)."""
from .adderize import adderize
from .attention import BiViTPass
from .fold import FoldBatchNormPass
from .maxout import MaxoutPass
from .passes import (PassContext, PassManager, SwapPass, candidates_in_order, layer_config, refresh_report,
                     replace_module, swap_layer)
from .records import fill_deployed_record, fill_record, new_record
from .rules import Decision, LayerSelector
from .trace import TraceResult, fx_graph, trace

__all__ = ["trace", "fx_graph", "TraceResult", "LayerSelector", "Decision", "PassContext", "PassManager", "SwapPass",
           "BiViTPass", "MaxoutPass", "FoldBatchNormPass", "replace_module", "candidates_in_order", "refresh_report",
           "swap_layer", "layer_config", "new_record", "fill_record", "fill_deployed_record", "adderize"]
