"""metamorph: metamorphic neural networks on PyTorch Lightning + Hydra."""

from metamorph.api import Metamorphic, load, load_metamorphic
from metamorph.models import create_model, list_models

__version__ = "0.1.0"
__all__ = [
    "Metamorphic",
    "create_model",
    "list_models",
    "load",
    "load_metamorphic",
    "__version__",
]
