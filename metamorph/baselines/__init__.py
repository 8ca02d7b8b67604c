"""Baselines of the NeuMeta comparison (Yang & Wang, ECCV 2024, Table 2 and Fig. 5).

* :mod:`metamorph.baselines.pruning`: structured pruning of the metamorphic blocks' hidden
  channels without fine-tuning (Torch-Pruning, importance L1 / L2 / random / Taylor / Hessian),
  plus a dependency-free L1 reference implementation;
* :mod:`metamorph.baselines.individual`: one network per shape, pruned (L1) from the pretrained
  one and fine-tuned (or trained from scratch with ``experiment=baselines/paper/individual_resnet20_cifar10``);
* :mod:`metamorph.baselines.slimmable`: a universally slimmable network over the metamorphic
  blocks' hidden width (sandwich rule, in-place distillation, per-width BN recalibration).

Torch-Pruning is the optional extra ``.[baselines]``; only the pruning functions that use it
import it, so the rest of this package works without it.
"""
