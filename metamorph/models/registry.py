"""A timm-style registry of architectures and the one factory that builds them, and the registry
of model families (how a model file's ``family`` + ``arch`` pair is rebuilt and written).

Families are keyed by class and registered where the class is defined
(:mod:`~metamorph.models.resnet_cifar`, :mod:`~metamorph.models.lowrank`): :func:`model_family`
picks the most specific registered class of a model, and among families of the same class the
one whose ``matches`` accepts it (a CIFAR ResNet with Tucker-2 layers is ``cifar_resnet_lowrank``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


@dataclass(frozen=True)
class ModelFamily:
    """How models of one family are rebuilt (``build(arch) -> module``, weights uninitialised)
    and described (``arch_of(module) -> dict``) for the model file format."""

    name: str
    cls: type
    build: Callable[[dict], nn.Module]
    arch_of: Callable[[nn.Module], dict]
    matches: Callable[[nn.Module], bool] | None = None


_FAMILIES: dict[str, ModelFamily] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its own name (``@register_model def resnet20(**kw): ...``)."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def register_family(
    name: str,
    cls: type,
    build: Callable[[dict], nn.Module],
    *,
    arch_of: Callable[[nn.Module], dict] | None = None,
    matches: Callable[[nn.Module], bool] | None = None,
) -> ModelFamily:
    """Register the model family ``name`` of class ``cls``. ``arch_of`` defaults to
    ``model.arch.to_dict()``; ``matches`` tells families of the same class apart."""
    if name in _FAMILIES and _FAMILIES[name].cls is not cls:
        raise ValueError(f"model family {name!r} is already registered for another class")
    fam = ModelFamily(name, cls, build, arch_of or (lambda m: m.arch.to_dict()), matches)
    _FAMILIES[name] = fam
    return fam


def list_models() -> list[str]:
    return sorted(_MODELS)


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture by name; keyword arguments go to its builder."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


def build_from_arch(family: str, arch: dict) -> nn.Module:
    """Rebuild a model from the ``family`` + ``arch`` pair stored in a model JSON file."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {list_families()}")
    return _FAMILIES[family].build(arch)


def family_of(model: nn.Module) -> ModelFamily:
    """The registered family of ``model``: most specific class first, then ``matches``."""
    mro = type(model).__mro__
    found = [f for f in _FAMILIES.values() if f.cls in mro]
    found.sort(key=lambda f: (mro.index(f.cls), f.matches is None))
    for f in found:
        if f.matches is None or f.matches(model):
            return f
    raise TypeError(
        f"{type(model).__name__} belongs to no registered model family; known: {list_families()}"
    )


def model_family(model: nn.Module) -> str:
    return family_of(model).name
