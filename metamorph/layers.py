"""The layer order of the package: which parts may import which (enforced by tests/test_layers.py).

A module may import another part only if that part has a strictly lower rank (or is its own part).
Parts with the same rank are independent of each other. A key is a package (``"export"``) or a
module inside one (``"export.formats"``); the longest matching key decides. Lower layers reach
upper ones only through the registries' declared plugin list
(:data:`metamorph.runtime.plugins.BUILTIN_PLUGINS`, imported by name on first lookup).
A new package must be added here (a new method goes under ``methods``, rank 10).
"""

LAYERS: dict[str, int] = {
    # foundations: no metamorph imports beyond these
    "config": 0,  # config schemas, where the shipped configs live
    "utils": 0,  # parameter / FLOP counting
    "models": 1,  # plain nn.Module architectures, their registry, structural transforms
    "data": 1,  # data sources, the CIFAR data module, tensor transforms
    "io": 2,  # model files (safetensors + JSON), atomic writes, foreign checkpoints
    "export.formats": 2,  # ONNX / torch.export writers (used by device measurement)
    "devices": 3,  # device profiles, latency / memory measurement, predictor, Budget
    "hypernet": 3,  # the INR and the metamorphic network
    "runtime": 4,  # run factories (data module, network, Trainer, device, summary) + registries
    "callbacks": 5,  # Lightning callbacks
    "export": 6,  # sampling, sweeps and staged outputs over metamorphic checkpoints
    "baselines": 7,  # slimmable network, pruning, individual baseline
    "tasks": 8,  # LightningModules and the runners of metamorph-train's tasks
    "search": 9,  # GeneCAI search and its methods
    "compare": 9,  # method comparison over sources
    # new methods (NN-Factory, Bespoke, Learngene Pool): one package each, above compare so that
    # a method registers its own comparison point source
    "methods": 10,
    "api": 11,  # the Python API (metamorph.load_metamorphic, ...)
    "": 12,  # metamorph/__init__.py (and any other root module not listed)
    "cli": 13,  # thin console entry points
    "layers": 0,  # this table
}
