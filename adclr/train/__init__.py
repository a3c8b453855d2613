"""ADCLR training: query tokens with one-way attention, DINO/iBOT losses, the EMA-teacher training loop."""
from .config import PRESETS, TrainConfig
from ..errors import NonFiniteLossError
from .engine import Trainer, train
from ..queries import QUERY_ATTENDS, embed_queries, forward_with_queries, one_way_attention_mask

__all__ = ["PRESETS", "QUERY_ATTENDS", "NonFiniteLossError", "TrainConfig", "Trainer", "embed_queries",
           "forward_with_queries", "one_way_attention_mask", "train"]
