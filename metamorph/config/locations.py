"""Where the shipped Hydra configs live.

The configs are package data (``metamorph/conf``), so every entry point finds them whether the
package is installed editable, from a wheel or from a source tree, and from any working directory.
Users add their own config directories with ``hydra.searchpath=[file:///path/to/conf]``.
"""

from __future__ import annotations

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
