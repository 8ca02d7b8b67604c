"""Lightning data module for CIFAR-10/100 held entirely in memory as uint8 tensors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .sources import CifarArrays, DataError, load_cifar
from .transforms import hwc_to_nchw, normalize, random_crop_flip

__all__ = ["CIFARDataModule", "stratified_indices"]

SPLITS = ("train", "val", "test")
Batch = tuple[torch.Tensor, torch.Tensor]


def stratified_indices(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` sorted indices into ``labels`` keeping class proportions (largest remainder),
    chosen at random within each class."""
    total = len(labels)
    if n >= total:
        return np.arange(total)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = counts * n / total
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(-(exact - quota), kind="stable")[: n - quota.sum()]] += 1
    perm = rng.permutation(total)
    grouped = perm[np.argsort(inverse[perm], kind="stable")]  # by class, random within class
    rank = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)  # position in class
    picked = grouped[rank < np.repeat(quota, counts)]
    return np.sort(picked)


class CIFARDataModule(L.LightningDataModule):
    """CIFAR-10/100 as in-memory uint8 tensors; augmentation and normalization run on the
    batch after it reaches the device (``on_after_batch_transfer``), so on the GPU for GPU runs.

    Splits: ``val`` is a seeded, class-stratified carve-out of ``val_size`` training images
    (``val_size=0``: no validation, ``val_dataloader`` returns ``[]``); ``test`` is the official
    test set. ``train_subset`` / ``test_subset`` optionally keep a stratified subset (for quick
    runs); ``train_subset`` is taken after the validation carve-out.

    Loaders yield ``(uint8 NCHW images, int64 labels)``; after transfer the trainer sees
    normalized float32 images (crop+flip augmented when ``augment`` and the trainer is training).
    Note: Lightning uses this hook instead of a model's own ``on_after_batch_transfer``.
    """

    def __init__(
        self,
        root: str,
        name: str = "cifar10",
        val_size: int = 5000,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
        std: Sequence[float] = (0.2470, 0.2435, 0.2616),
        download: bool = False,
        cache_dir: str | Path | None = None,
        train_subset: int | None = None,
        test_subset: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = str(root)
        self.name = name
        self.val_size = int(val_size)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.download = bool(download)
        self.cache_dir = cache_dir
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.padding = 4
        self.set_normalization(mean, std)
        self._classes: list[str] | None = None
        self._data: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._aug_generator = torch.Generator().manual_seed(self.seed + 1)

    # ----------------------------------------------------------------------------------------
    # Loading and splitting
    # ----------------------------------------------------------------------------------------

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Use the per-channel ``mean``/``std`` a model expects (inputs scaled to [0, 1])."""
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"need 3 means and 3 positive stds, got {self.mean}, {self.std}")

    def prepare_data(self) -> None:
        """Download (if requested) and fill the decoded-array cache, once per node."""
        load_cifar(self.root, self.name, download=self.download, cache_dir=self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Load the arrays once and build the train/val/test tensors (idempotent)."""
        if self._data is not None:
            return
        arrays = load_cifar(self.root, self.name, download=self.download, cache_dir=self.cache_dir)
        self._build(arrays)

    def _build(self, arrays: CifarArrays) -> None:
        n_train = len(arrays.train)
        if not 0 <= self.val_size < n_train:
            raise DataError(
                f"val_size={self.val_size} must be in [0, {n_train}): the training split of "
                f"{self.root} has {n_train} images; lower data.val_size"
            )
        labels = arrays.train.labels
        val_idx = stratified_indices(labels, self.val_size, np.random.default_rng([self.seed, 0]))
        train_idx = np.setdiff1d(np.arange(n_train), val_idx, assume_unique=True)
        if self.train_subset is not None:
            keep = stratified_indices(
                labels[train_idx], int(self.train_subset), np.random.default_rng([self.seed, 1])
            )
            train_idx = train_idx[keep]
        test_idx = np.arange(len(arrays.test))
        if self.test_subset is not None:
            test_idx = stratified_indices(
                arrays.test.labels, int(self.test_subset), np.random.default_rng([self.seed, 2])
            )

        def tensors(split, idx) -> tuple[torch.Tensor, torch.Tensor]:
            return hwc_to_nchw(split.images[idx]), torch.from_numpy(split.labels[idx].copy())

        self._classes = list(arrays.classes)
        self._data = {
            "train": tensors(arrays.train, train_idx),
            "val": tensors(arrays.train, val_idx),
            "test": tensors(arrays.test, test_idx),
        }

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; expected one of {SPLITS}")
        if self._data is None:
            self.setup()
        return self._data[split]

    @property
    def classes(self) -> list[str]:
        """Class names (index = label id); loads the data if needed."""
        if self._classes is None:
            self.setup()
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ``(uint8 NCHW images, int64 labels)`` of ``"train"``, ``"val"`` or ``"test"``."""
        return self._split(split)

    def subset(self, split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` images of a ``seed``-ed permutation of ``split`` (uint8, labels)."""
        x, y = self._split(split)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(int(seed)))[:n]
        return x[perm], y[perm]

    # ----------------------------------------------------------------------------------------
    # Loaders and the on-device transform
    # ----------------------------------------------------------------------------------------

    def _loader(self, split: str, train: bool) -> DataLoader:
        x, y = self._split(split)
        dataset = TensorDataset(x, y)
        kwargs = dict(
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )
        if train:
            return DataLoader(
                dataset,
                batch_size=self.batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(self.seed),
                # A set smaller than one batch would otherwise yield no batches at all.
                drop_last=len(dataset) >= self.batch_size,
                **kwargs,
            )
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        """The validation loader, or ``[]`` (no validation) when ``val_size == 0``."""
        if len(self._split("val")[1]) == 0:
            return []
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def transform_batch(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """uint8 NCHW batch -> normalized float32 (optionally crop+flip augmented first)."""
        if augment:
            x = random_crop_flip(x, padding=self.padding, generator=self._aug_generator)
        return normalize(x, self.mean, self.std)

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        x, y = batch
        trainer = self.trainer
        training = trainer is not None and bool(trainer.training)
        return self.transform_batch(x, augment=self.augment and training), y

    def normalized_batches(
        self,
        split: str | tuple[torch.Tensor, torch.Tensor],
        batch_size: int | None = None,
        device: str | torch.device | None = None,
    ) -> Iterator[Batch]:
        """Yield normalized ``(float images, labels)`` batches in order, outside a Trainer.

        ``split`` is ``"train"``/``"val"``/``"test"`` or an ``(images, labels)`` pair such as
        :meth:`subset` returns. No augmentation.
        """
        x, y = self._split(split) if isinstance(split, str) else split
        bs = batch_size or self.eval_batch_size
        for i in range(0, len(y), bs):
            xb = x[i : i + bs].to(device) if device is not None else x[i : i + bs]
            yb = y[i : i + bs].to(device) if device is not None else y[i : i + bs]
            yield self.transform_batch(xb), yb

    iterate_split = normalized_batches
