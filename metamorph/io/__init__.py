"""Reading and writing models and checkpoints without pickle."""

from metamorph.io.atomic import atomic_path, atomic_write, atomic_write_text
from metamorph.io.model_file import load_model, read_model_json, save_model

__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_text",
    "load_model",
    "read_model_json",
    "save_model",
]
