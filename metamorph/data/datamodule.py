"""Lightning data module for CIFAR-10/100 held entirely in memory as uint8 tensors."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from .sources import CifarArrays, DataError, load_cifar
from .transforms import hwc_to_nchw, normalize, random_crop_flip

__all__ = ["CIFARDataModule", "EpochSampler", "ResumableLoader", "stratified_indices"]

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


class EpochSampler(DistributedSampler):
    """Shuffles the dataset afresh each epoch: the order of epoch ``e`` is
    ``randperm(n, generator=Generator().manual_seed(seed * 1_000_003 + e))``, a function of
    ``(seed, e)`` only; Lightning advances ``e`` through :meth:`set_epoch`.

    With ``num_replicas > 1`` the order is padded and dealt out to the ranks exactly like
    :class:`~torch.utils.data.DistributedSampler` (of which this is a subclass, so Lightning
    does not wrap it in a distributed sampler of its own); ``num_replicas=1`` is plain shuffling.

    :attr:`start` (set by :class:`ResumableLoader` when it resumes) drops that many indices
    from the front of the next iteration only: a slice of the index list, no data is loaded.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full index order of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = len(self.dataset)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        if n and self.total_size > n:  # pad by repetition like DistributedSampler
            order = (order * -(-self.total_size // n))[: self.total_size]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return iter(self.indices()[start:])


class ResumableLoader(DataLoader):
    """The training :class:`DataLoader`, resumable mid-epoch (Lightning's ``state_dict`` /
    ``load_state_dict`` loader interface).

    It counts the batches it has yielded in the current epoch (in the main process, so also
    with ``num_workers > 0``). :meth:`state_dict` is ``{"epoch", "batches_done", "seed"}``;
    Lightning's training fetcher does not read ahead of a loader with a length, so
    ``batches_done`` is the number of batches the training has taken. After
    :meth:`load_state_dict` the next iteration of that epoch starts at batch ``batches_done``
    (the sampler's index list is sliced, skipped batches are never loaded). An iteration
    starts lazily, at its first batch, so it uses the epoch Lightning set with ``set_epoch``
    even when ``iter()`` was called earlier (as Lightning does when it resumes).
    :attr:`position` is ``(epoch, index)`` of the last batch yielded.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int | None = 1,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        sampler: Any = None,
        **kwargs: Any,
    ) -> None:
        if sampler is None:
            sampler = EpochSampler(dataset, seed=seed, num_replicas=num_replicas, rank=rank)
        # A generator of its own keeps the per-iterator worker base seed off the global RNG.
        kwargs.setdefault("generator", torch.Generator().manual_seed(int(seed)))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.seed = int(seed)
        self._epoch = int(getattr(sampler, "epoch", 0))
        self._done = 0
        self._resume: tuple[int, int] | None = None
        self.position: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        epoch = int(getattr(self.sampler, "epoch", 0))
        skip = 0
        if self._resume is not None:
            resume_epoch, done = self._resume
            self._resume = None
            if resume_epoch == epoch and done > 0:  # else that epoch was over: start afresh
                if isinstance(self.sampler, EpochSampler) and self.batch_size is not None:
                    self.sampler.start = done * self.batch_size
                    skip = done
                else:
                    warnings.warn(
                        f"{type(self).__name__}: cannot skip the {done} batches already trained "
                        f"on with sampler {type(self.sampler).__name__}; the epoch restarts",
                        stacklevel=2,
                    )
        self._epoch, self._done = epoch, skip
        for batch in super().__iter__():
            self.position = (epoch, self._done)
            self._done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches_done": self._done, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        epoch, done = int(state_dict["epoch"]), int(state_dict["batches_done"])
        if int(state_dict.get("seed", self.seed)) != self.seed:
            warnings.warn(
                f"{type(self).__name__}: resuming with seed {self.seed}, but the state was saved "
                f"with seed {state_dict['seed']}: the rest of the epoch is a different order",
                stacklevel=2,
            )
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self._epoch, self._done = epoch, done
        self._resume = (epoch, done)
        self.position = None


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

    Resuming: the training loader (:class:`ResumableLoader` over an :class:`EpochSampler`) is
    resumable mid-epoch. Its order in epoch ``e`` depends only on ``(seed, e)``, and the
    augmentation of a training batch only on ``(seed, e, batch index, rank)``; Lightning stores
    the loader's position (epoch, batches taken) in the checkpoint's loop state, so a run
    killed mid-epoch and resumed from ``last.ckpt`` trains on exactly the batches (same images,
    order and augmentation) of an uninterrupted run. Under DDP the sampler shards the order
    itself, like ``DistributedSampler``. Outside a Trainer the order only changes when
    ``set_epoch`` is called; :meth:`transform_batch` without a ``generator`` draws from a
    stateful generator of the data module.
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
            trainer = self.trainer  # None outside a Trainer
            return ResumableLoader(
                dataset,
                batch_size=self.batch_size,
                seed=self.seed,
                num_replicas=getattr(trainer, "world_size", 1),  # shards itself under DDP
                rank=getattr(trainer, "global_rank", 0),
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

    def transform_batch(
        self, x: torch.Tensor, augment: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """uint8 NCHW batch -> normalized float32 (optionally crop+flip augmented first, drawing
        from ``generator``, by default a stateful generator of the data module)."""
        if augment:
            gen = generator if generator is not None else self._aug_generator
            x = random_crop_flip(x, padding=self.padding, generator=gen)
        return normalize(x, self.mean, self.std)

    def augment_generator(self, epoch: int, batch: int, rank: int = 0) -> torch.Generator:
        """The generator that augments training batch ``batch`` of ``epoch`` (on ``rank``)."""
        key = np.random.SeedSequence([self.seed % 2**64, epoch, batch, rank])
        return torch.Generator().manual_seed(int(key.generate_state(1, np.uint64)[0]))

    def _train_batch_generator(self) -> torch.Generator | None:
        """The generator of the training batch the trainer's loader yielded last, if known."""
        loader = getattr(self.trainer, "train_dataloader", None)
        if not isinstance(loader, ResumableLoader) or loader.position is None:
            return None
        rank = loader.sampler.rank if isinstance(loader.sampler, EpochSampler) else 0
        return self.augment_generator(*loader.position, rank=rank)

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        x, y = batch
        trainer = self.trainer
        augment = self.augment and trainer is not None and bool(trainer.training)
        # Lightning transfers each training batch right after taking it from the loader (no
        # read-ahead for a loader with a length), so the loader's position names this batch.
        gen = self._train_batch_generator() if augment else None
        return self.transform_batch(x, augment=augment, generator=gen), y

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
