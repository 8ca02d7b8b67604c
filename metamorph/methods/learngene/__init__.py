"""Learngene Pool (Shi et al., AAAI 2024, arXiv 2312.05743) and its SN-Net baseline (Pan et al.,
CVPR 2023): distil one ancestry into small auxiliary models, pool their blocks (learngene
instances), stitch them with learnable layers into descendants of many sizes, fine-tune once.

Modules: :mod:`.auxiliary` (auxiliary models, transformation layers, the distillation loss),
:mod:`.stitch` (least-squares and transposed-mean stitch init), :mod:`.pool` (the stitched system,
its descendants and costs, the system file; SN-Net is the same system over pretrained anchors),
:mod:`.module` (LightningModules), :mod:`.task` (``metamorph-train`` tasks and checkpoint kinds),
:mod:`.customize` (``metamorph-customize method=learngene``), :mod:`.config` (typed schemas).
The networks are block sequences (:mod:`metamorph.models.blockseq`): CIFAR ResNets and ViTs.
"""

from metamorph.methods.learngene.pool import Descendant, StitchedSystem, load_system, save_system

__all__ = ["Descendant", "StitchedSystem", "load_system", "save_system"]
