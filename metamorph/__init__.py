"""metamorph: metamorphic neural networks on PyTorch Lightning + Hydra."""

from metamorph.io.model_file import load_model as load
from metamorph.models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load", "__version__"]
