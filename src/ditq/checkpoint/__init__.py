"""Checkpoint files: streaming read/write (``io``), ComfyUI / convert-to-quant / legacy key layouts
(``layout``) and per-layer policy (``policy``). Shared by the converter and the runtime loader; knows no
model."""

from .io import Checkpoint, SafetensorsWriter, ShardedWriter, open_checkpoint
from .layout import Entry, Layout, iter_layers, scan
from .policy import PRESETS, Decision, Policy, detect_family

__all__ = [
    "Checkpoint",
    "Decision",
    "Entry",
    "Layout",
    "PRESETS",
    "Policy",
    "SafetensorsWriter",
    "ShardedWriter",
    "detect_family",
    "iter_layers",
    "open_checkpoint",
    "scan",
]
