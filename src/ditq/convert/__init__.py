"""The offline pipeline: ``convert_checkpoint`` (``ditq convert``) streams a checkpoint into an 8-bit file."""

from .convert import ConvertReport, LayerRecord, convert_checkpoint

__all__ = ["ConvertReport", "LayerRecord", "convert_checkpoint"]
