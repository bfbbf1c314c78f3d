"""Runtime: quantize a loaded model in place (``quantize_``) or fill a model skeleton from a converted
file (``load_quantized``). Both leave ``QuantizedTensor`` weights in the model's ``nn.Linear`` layers,
which send ``F.linear`` to ditq's kernels."""

from .load import LoadReport, empty_weights, load_quantized
from .quantize import QuantizeReport, model_bytes, quantize_

__all__ = ["LoadReport", "QuantizeReport", "empty_weights", "load_quantized", "model_bytes", "quantize_"]
