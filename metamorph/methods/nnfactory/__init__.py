"""NN-Factory (Xu et al., arXiv 2308.15003): a modular supernet whose modules are switched on per
task, a generative assembler (task, sparsity) -> module mask, and customization for a task and a
device budget by searching the assembler's conditioning, with no training per customization.

Modules: :mod:`.class_tasks` (class-subset tasks, the seen/unseen split, task accuracy),
:mod:`.supernet` (the modular supernet, physical extraction), :mod:`.family` (assemblies as a
sub-network family), :mod:`.assembler` (G and its hard masks), :mod:`.module` (the two stages'
LightningModules), :mod:`.task` (their ``metamorph-train`` tasks and checkpoint kinds),
:mod:`.factory` (the trained factory file), :mod:`.customize` (``metamorph-customize``).
"""

from metamorph.methods.nnfactory.family import AssemblyFamily
from metamorph.methods.nnfactory.supernet import ModularSupernet

__all__ = ["AssemblyFamily", "ModularSupernet"]
