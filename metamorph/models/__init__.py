"""Architectures (plain ``nn.Module``s), their registry and structural transforms."""

from metamorph.models.dwsep import DWSEP_FAMILY, DWSepConv
from metamorph.models.folding import fold_batchnorm, fold_conv_bn, insert_batchnorm
from metamorph.models.lowrank import LOWRANK_FAMILY, Tucker2Conv
from metamorph.models.registry import (
    build_from_arch,
    create_model,
    family_of,
    list_families,
    list_models,
    model_family,
    register_family,
    register_model,
)
from metamorph.models.resnet_cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BasicBlock,
    CifarResNet,
    ResNetArch,
    cifar_resnet_arch,
)
from metamorph.models.stitched import StitchedArch, StitchedNet
from metamorph.models.vit import CifarViT, ViTArch

__all__ = [
    "BasicBlock",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DWSEP_FAMILY",
    "DWSepConv",
    "CifarResNet",
    "CifarViT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LOWRANK_FAMILY",
    "ResNetArch",
    "StitchedArch",
    "StitchedNet",
    "Tucker2Conv",
    "ViTArch",
    "build_from_arch",
    "cifar_resnet_arch",
    "create_model",
    "family_of",
    "fold_batchnorm",
    "insert_batchnorm",
    "fold_conv_bn",
    "list_families",
    "list_models",
    "model_family",
    "register_family",
    "register_model",
]
