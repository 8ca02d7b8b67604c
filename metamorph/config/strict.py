"""Strict command-line overrides: every entry point refuses a key its config does not have.

Hydra refuses an unknown ``key=value`` with a hint to write ``+key=value``, and then takes
``+key=value`` (or ``++key=value``) silently: a typo such as ``+calibrat=1280`` ran with the option
dropped. :func:`check_overrides` runs before Hydra, for the primary config of the entry point and
over every group: it composes the config with the command line's group choices only (the
reference), then checks each value override's key against it. Valid keys at a node are the
reference's keys, the fields of the node's dataclass schema (:data:`SCHEMAS`) and, for a
``_target_`` node, the target's parameters; nodes that are open by design (dict fields such as
``model.kwargs``, a target taking ``**kwargs``, the named entries of ``callbacks`` / ``logger``)
take any key. An unknown key fails with the closest valid key (difflib) and the valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig

from metamorph.config.schema import DataConfig, ModelConfig, OptimConfig, SchedulerConfig

# dataclass schema of a config node, by its dotted path (fields with defaults need not be in the
# YAML, so they are valid keys even where the YAML omits them)
SCHEMAS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "task.optim": OptimConfig,
    "task.scheduler": SchedulerConfig,
}


class UnknownKeyError(ValueError):
    """An override names a key the composed config does not have."""


def _field_names(schema: type) -> set[str]:
    return {f.name for f in dataclasses.fields(schema)}


def _open_fields(schema: type) -> set[str]:
    """Fields typed as dicts: any key below them is the user's (e.g. ``model.kwargs``)."""
    return {f.name for f in dataclasses.fields(schema) if "dict" in str(f.type).lower()}


def _target_params(node: DictConfig) -> tuple[set[str], bool] | None:
    """(parameter names, takes **kwargs) of a ``_target_`` node's callable, if it can be found."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not isinstance(target, str):
        return None
    try:
        from hydra.utils import get_object

        obj = get_object(target)
        sig = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # noqa: BLE001 - an unimportable target is Hydra's error to report
        return None
    names = {p for p in sig.parameters if p != "self"}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return names | {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}, var_kw


def _is_collection(node: Any) -> bool:
    """A dict of named ``_target_`` configs (callbacks, loggers): new names are allowed."""
    if not isinstance(node, DictConfig) or len(node) == 0:
        return False
    try:
        return all(isinstance(v, DictConfig) and "_target_" in v for v in node.values())
    except Exception:  # noqa: BLE001 - unresolvable interpolations: not a collection
        return False


def valid_keys(node: Any, path: str) -> tuple[set[str], bool]:
    """(valid keys at ``node`` (dotted ``path``), whether any key is allowed there)."""
    keys: set[str] = set(node.keys()) if isinstance(node, DictConfig) else set()
    open_ = _is_collection(node)
    if path in SCHEMAS:
        keys |= _field_names(SCHEMAS[path])
    parent, _, name = path.rpartition(".")
    if parent in SCHEMAS and name in _open_fields(SCHEMAS[parent]):
        open_ = True
    target = _target_params(node)
    if target is not None:
        keys |= target[0]
        open_ = open_ or target[1]
    return {str(k) for k in keys}, open_


def check_key(cfg: DictConfig, key: str, override: str) -> None:
    """Raise :class:`UnknownKeyError` unless dotted ``key`` may be set on ``cfg``."""
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        path = ".".join(parts[:i])
        if isinstance(node, ListConfig):
            return  # an index into a list: Hydra checks it
        if not isinstance(node, DictConfig):
            return  # below a leaf or a null node: Hydra reports a type problem itself
        keys, open_ = valid_keys(node, path)
        if part in keys:
            if part not in node:
                return  # a schema field or target parameter the YAML leaves out
            child = node._get_node(part)
            if not isinstance(child, (DictConfig, ListConfig)):
                return  # a leaf (or null): Hydra checks what is set on it
            node = child
            continue
        if open_:
            return
        raise UnknownKeyError(_unknown_message(part, path, keys, override))


def _unknown_message(part: str, path: str, keys: set[str], override: str) -> str:
    where = f"`{path}`" if path else "the top level"
    full = f"{path}.{part}" if path else part
    shown = sorted(k for k in keys if not k.startswith("_"))
    close = difflib.get_close_matches(part, shown, n=1, cutoff=0.6)
    msg = f"unknown option `{full}` (in `{override}`)"
    if close:
        fixed = override.lstrip("+").replace(full, f"{path}.{close[0]}" if path else close[0], 1)
        msg += f"; did you mean `{close[0]}` ({fixed})?"
    return msg + f" Valid keys of {where}: {', '.join(shown)}"


def _first_value(o) -> str | None:
    """The value of a group override as a plain string (the first one of a sweep)."""
    try:
        if o.is_sweep_override():
            return next(iter(o.sweep_string_iterator()))
        return o.get_value_element_as_str()
    except Exception:  # noqa: BLE001
        return None


def check_overrides(config_dir: str, config_name: str, overrides: Sequence[str]) -> None:
    """Raise :class:`UnknownKeyError` for the first override that names an unknown key.

    Anything this check cannot interpret (unparsable overrides, a reference that does not
    compose, e.g. an unknown group option) is left to Hydra, which reports it itself."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # noqa: BLE001 - Hydra prints its own parse error
        return
    was_initialized = GlobalHydra.instance().is_initialized()
    if was_initialized:
        return  # inside a running Hydra app (tests compose themselves); nothing to pre-check
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            repo = GlobalHydra.instance().config_loader().repository
            groups, values = [], []
            for o, text in zip(parsed, overrides):
                key = o.key_or_group
                if key == "hydra" or key.startswith(("hydra.", "hydra/")):
                    if key.startswith("hydra/") or key == "hydra.searchpath":
                        groups.append(text)
                    continue
                if o.is_delete():
                    continue
                if "/" in key or o.package is not None or repo.group_exists(key):
                    value = _first_value(o)
                    if value is not None:
                        prefix = "++" if o.is_force_add() else "+" if o.is_add() else ""
                        groups.append(f"{prefix}{key}={value}")
                    continue
                values.append((key, text))
            if not values:
                return
            try:
                ref = compose(config_name=config_name, overrides=groups)
            except Exception:  # noqa: BLE001 - Hydra reports a bad group choice itself
                return
    finally:
        if GlobalHydra.instance().is_initialized() and not was_initialized:
            GlobalHydra.instance().clear()
    for key, text in values:
        check_key(ref, key, text)
