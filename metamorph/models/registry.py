"""A timm-style registry of architectures and the one factory that builds them."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from metamorph.models.resnet_cifar import CifarResNet, ResNetArch, cifar_resnet_arch

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILIES: dict[str, Callable[[dict], nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its own name (``@register_model def resnet20(**kw): ...``)."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def register_family(name: str, builder: Callable[[dict], nn.Module]) -> None:
    """Register how to rebuild a model of family ``name`` from its architecture dict."""
    _FAMILIES[name] = builder


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture by name; keyword arguments go to its builder."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


def build_from_arch(family: str, arch: dict) -> nn.Module:
    """Rebuild a model from the ``family`` + ``arch`` pair stored in a model JSON file."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[family](arch)


def model_family(model: nn.Module) -> str:
    for name, _ in _FAMILIES.items():
        if name == "cifar_resnet" and isinstance(model, CifarResNet):
            return name
    raise TypeError(f"{type(model).__name__} belongs to no registered model family")


register_family("cifar_resnet", lambda arch: CifarResNet(ResNetArch.from_dict(dict(arch))))


def _make_resnet(depth: int) -> Callable[..., nn.Module]:
    def builder(**kwargs) -> nn.Module:
        return CifarResNet(cifar_resnet_arch(depth=depth, **kwargs))

    builder.__name__ = f"resnet{depth}"
    builder.__doc__ = f"CIFAR ResNet-{depth} ({(depth - 2) // 6} BasicBlocks per stage)."
    return builder


for _depth in (20, 32, 44, 56, 110):
    register_model(_make_resnet(_depth))
