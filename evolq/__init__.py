"""evolq: gradient-free search of quantization scales for vision transformers (Evol-Q and beyond).

The quantized model seen as black-box objectives over each attention block's scale vector::

    import evolq
    model = evolq.load_default()
    qmodel = evolq.QuantizedModel(model, "w4a8").calibrate(images)
    f = evolq.BlockObjective(qmodel, block=5, images=images)
    f(f.x0), f.batch([f.x0, 1.01 * f.x0])
"""

from evolq.allocator import reuse_freed_memory
from evolq.blocks import SEARCH_SPACES, Block, Segment
from evolq.data import load_data, load_fmnist
from evolq.errors import RunError, UsageError
from evolq.export import export_onnx
from evolq.losses import LOSSES, get_loss
from evolq.models import create_model
from evolq.objective import BlockObjective, fp_logits, model_loss
from evolq.pipeline import RunConfig, load_quantized, run_quantize
from evolq.qmodel import QuantizedModel
from evolq.quant.config import PRESETS, QuantConfig
from evolq.search import SearchResult, search
from evolq.zoo import load_default

__version__ = "0.1.0"  # the one place of the version: pyproject.toml reads this literal (no import)

__all__ = [
    "Block", "BlockObjective", "LOSSES", "PRESETS", "QuantConfig", "QuantizedModel", "RunConfig", "RunError",
    "SEARCH_SPACES", "SearchResult", "Segment", "UsageError", "create_model", "export_onnx", "fp_logits", "get_loss",
    "load_data", "load_default", "load_fmnist", "load_quantized", "model_loss", "reuse_freed_memory", "run_quantize",
    "search",
]
