"""NN-Factory assemblies as a sub-network family: descriptor = the module mask of the supernet.

Registered with the sub-network family registry, so the protocol tests, sweeps and budgeted
selection treat assemblies like any other member space; ``materialize`` is the physical
extraction (:meth:`ModularSupernet.extract`), ``forward_at`` the masked supernet.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from metamorph.methods.nnfactory.supernet import ModularSupernet, arch_costs, random_mask
from metamorph.models.resnet_cifar import CifarResNet, cifar_resnet_arch
from metamorph.models.subnet import SubnetFamily, register_subnet_family

Mask = tuple[int, ...]


@register_subnet_family
class AssemblyFamily(SubnetFamily):
    """The assemblies of one :class:`ModularSupernet` (10-way head; a task model restricts it
    with ``classes``)."""

    family_name = "nnfactory"

    def __init__(self, supernet: ModularSupernet, max_sparsity: float = 0.9) -> None:
        self.supernet = supernet.eval()
        self.max_sparsity = float(max_sparsity)

    def validate(self, desc) -> Mask:
        return self.supernet.check_mask(desc)

    def materialize(self, desc) -> nn.Module:
        return self.supernet.extract(self.validate(desc))

    @torch.no_grad()
    def forward_at(self, x: torch.Tensor, desc) -> torch.Tensor:
        m = torch.tensor(self.validate(desc), dtype=x.dtype, device=x.device)
        return self.supernet.eval()(x, m)

    def arch_for(self, desc):
        return self.supernet.arch_for(self.validate(desc))

    def cost_module(self, desc) -> nn.Module:
        with torch.device("meta"):
            return CifarResNet(self.arch_for(desc))

    def costs(self, desc, input_size: tuple[int, int] = (32, 32)) -> dict[str, int]:
        return arch_costs(self.arch_for(desc), input_size[0])

    def describe(self, desc) -> dict:
        return {"family": self.family_name, **self.supernet.describe(self.validate(desc))}

    def full(self) -> Mask:
        return tuple([1] * self.supernet.num_modules)

    def sample(self, rng: np.random.Generator) -> Mask:
        s = float(rng.uniform(0.0, self.max_sparsity))
        return random_mask(self.supernet.num_modules, s, rng)

    def gamma_of(self, desc) -> float:
        m = self.validate(desc)
        return 1 - sum(m) / len(m)

    @classmethod
    def example(cls) -> AssemblyFamily:
        torch.manual_seed(0)
        net = CifarResNet(cifar_resnet_arch(depth=14, stage_widths=[4, 8, 8]))
        with torch.no_grad():  # non-trivial BN statistics, so extraction is tested with them
            g = torch.Generator().manual_seed(0)
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
        return cls(ModularSupernet(net.eval(), groups=2))
