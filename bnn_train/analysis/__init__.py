"""Analysis of binary networks: model summary (params, BOPs/FLOPs/OPs, size) and sign-flip ratio."""

from bnn_train.analysis.flips import FlipTracker
from bnn_train.analysis.summary import LayerRow, ModelSummary, summarize

__all__ = ["FlipTracker", "LayerRow", "ModelSummary", "summarize"]
