"""The data module of a run, from its ``data`` config group."""

from __future__ import annotations

from omegaconf import DictConfig

from metamorph.config.schema import DataConfig, typed


def build_datamodule(cfg: DictConfig, mean=None, std=None, seed: int = 0):
    """The CIFAR datamodule described by ``cfg.data``, normalised like the model expects."""
    from metamorph.data import CIFARDataModule

    d: DataConfig = typed(DataConfig, cfg, "data")
    dm = CIFARDataModule(
        root=d.root,
        name=d.name,
        val_size=d.val_size,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        num_workers=d.num_workers,
        seed=seed,
        augment=d.augment,
        download=d.download,
        cache_dir=d.cache_dir,
        train_subset=d.train_subset,
        test_subset=d.test_subset,
    )
    if mean is not None:
        dm.set_normalization(mean, std)
    return dm
