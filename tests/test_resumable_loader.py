"""The resumable training loader of ``CIFARDataModule``: a run stopped mid-epoch and resumed
from its checkpoint trains on exactly the batches (images, order, augmentation) of an
uninterrupted run (tiny synthetic data, CPU)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.combined_loader import _shutdown_workers_and_reset_iterator
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    SequentialSampler,
    TensorDataset,
)

from metamorph.data import CIFARDataModule
from metamorph.data.datamodule import EpochSampler, ResumableLoader
from metamorph.data.sources import ArraySplit, CifarArrays

torch.set_num_threads(1)

NOT_RESUMABLE = "your dataloader is not resumable"


class SyntheticDM(CIFARDataModule):
    """``CIFARDataModule`` over ``n`` random images whose labels are their ids (0..n-1)."""

    def __init__(self, n: int = 52, n_test: int = 8, **kw) -> None:
        kw.setdefault("val_size", 0)
        kw.setdefault("batch_size", 8)
        super().__init__("synthetic", **kw)
        rng = np.random.default_rng(123)
        self._build(
            CifarArrays(
                train=ArraySplit(
                    rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n)
                ),
                test=ArraySplit(
                    rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), np.arange(n_test)
                ),
                classes=[f"c{i}" for i in range(n)],
            )
        )

    def prepare_data(self) -> None:  # nothing on disk
        pass


def _cat(batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _augmented(dm, loader, batches_iter):
    """Take batches from ``batches_iter`` and augment each as the trainer would."""
    dm.trainer = SimpleNamespace(training=True, train_dataloader=loader)
    try:
        return [dm.on_after_batch_transfer(b, 0) for b in batches_iter]
    finally:
        dm.trainer = None


def _close(*loaders):
    """Stop persistent workers now, as Lightning does at teardown (torch's worker shutdown
    stalls for seconds when the garbage collector frees such a loader later)."""
    for loader in loaders:
        _shutdown_workers_and_reset_iterator(loader)


# ----------------------------------------------------------------------------------------------
# The loader alone
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop", [1, 3, 5])
def test_loader_resumes_mid_epoch(num_workers, stop):
    kw = dict(n=44, batch_size=8, seed=5, num_workers=num_workers)  # 5 batches, 4 dropped
    ref_dm = SyntheticDM(**kw)
    ref = ref_dm.train_dataloader()
    assert len(ref) == 5
    epoch0 = _augmented(ref_dm, ref, iter(ref))
    ref.sampler.set_epoch(1)
    epoch1 = _augmented(ref_dm, ref, iter(ref))
    assert [len(b[1]) for b in epoch0 + epoch1] == [8] * 10  # drop_last as before
    assert not torch.equal(_cat(epoch0)[1], _cat(epoch1)[1])  # a new order each epoch

    dm = SyntheticDM(**kw)
    loader = dm.train_dataloader()
    it = iter(loader)
    first = _augmented(dm, loader, (next(it) for _ in range(stop)))
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches_done": stop, "seed": 5}
    del it
    _close(loader)

    dm = SyntheticDM(**kw)  # a fresh process: new data module, new loader
    loader = dm.train_dataloader()
    loader.load_state_dict(state)
    assert len(loader) == 5  # Lightning's epoch length is unchanged
    rest = _augmented(dm, loader, iter(loader))
    assert len(rest) == 5 - stop
    for got, want in zip(first + rest, epoch0, strict=True):
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert loader.state_dict() == {"epoch": 0, "batches_done": 5, "seed": 5}
    loader.sampler.set_epoch(1)
    nxt = _augmented(dm, loader, iter(loader))
    _close(ref, loader)
    for got, want in zip(nxt, epoch1, strict=True):
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


class CountingDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.n, self.loaded = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.loaded.append(i)
        return i


def test_resume_skips_without_loading_and_keeps_partial_batch():
    full = [b.tolist() for b in ResumableLoader(CountingDataset(10), batch_size=4, seed=1)]
    assert [len(b) for b in full] == [4, 4, 2]  # drop_last=False keeps the last partial batch
    ds = CountingDataset(10)
    loader = ResumableLoader(ds, batch_size=4, seed=1)
    loader.load_state_dict({"epoch": 0, "batches_done": 2, "seed": 1})
    assert [b.tolist() for b in loader] == full[2:]
    assert ds.loaded == full[2]  # the two skipped batches were never loaded


def test_state_of_a_finished_epoch_starts_the_next_one_whole():
    """A checkpoint taken after the last batch: Lightning sets the next epoch, which is whole."""
    ref = ResumableLoader(TensorDataset(torch.arange(12)), batch_size=4, seed=2)
    ref.sampler.set_epoch(1)
    want = [b[0].tolist() for b in ref]
    loader = ResumableLoader(TensorDataset(torch.arange(12)), batch_size=4, seed=2)
    loader.load_state_dict({"epoch": 0, "batches_done": 3, "seed": 2})
    it = iter(loader)  # Lightning calls iter() before set_epoch on resume ...
    loader.sampler.set_epoch(1)  # ... the iteration starts at its first batch
    assert [b[0].tolist() for b in it] == want


def test_epoch_sampler_shards_like_distributed_sampler():
    ds = TensorDataset(torch.arange(11))
    ranks = [EpochSampler(ds, seed=3, num_replicas=2, rank=r) for r in range(2)]
    assert isinstance(ranks[0], DistributedSampler)  # so Lightning does not wrap it under DDP
    for s in ranks:
        s.set_epoch(4)
    parts = [list(s) for s in ranks]
    assert [len(p) for p in parts] == [len(s) for s in ranks] == [6, 6]
    single = EpochSampler(ds, seed=3)
    single.set_epoch(4)
    order = torch.randperm(11, generator=torch.Generator().manual_seed(3 * 1_000_003 + 4))
    assert list(single) == order.tolist()
    padded = order.tolist() + order.tolist()[:1]  # padded to 12 and dealt out, like torch's
    assert parts == [padded[0::2], padded[1::2]]
    # a rank resumes within its own shard
    loader = ResumableLoader(ds, batch_size=2, seed=3, num_replicas=2, rank=1)
    loader.load_state_dict({"epoch": 4, "batches_done": 1, "seed": 3})
    assert torch.cat([b[0] for b in loader]).tolist() == parts[1][2:]


def test_lightning_can_reinstantiate_the_loader():
    """``overfit_batches`` makes Lightning rebuild the loader with a sequential sampler."""
    from lightning.fabric.utilities.data import _replace_dunder_methods

    ds = TensorDataset(torch.arange(10))
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = ResumableLoader(ds, batch_size=4, seed=0, drop_last=True)
    new = _update_dataloader(loader, SequentialSampler(ds))
    assert isinstance(new, ResumableLoader)
    assert [b[0].tolist() for b in new] == [[0, 1, 2, 3], [4, 5, 6, 7]]


# ----------------------------------------------------------------------------------------------
# Through a Lightning Trainer: uninterrupted vs stopped and resumed from last.ckpt
# ----------------------------------------------------------------------------------------------


class Recorder(L.LightningModule):
    """A linear classifier that records every training batch it sees (after augmentation)."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3 * 32 * 32, n_classes)
        self.seen: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.current_epoch, batch_idx, y.clone(), x.clone()))
        return torch.nn.functional.cross_entropy(self.lin(x.flatten(1)), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.cross_entropy(self.lin(x.flatten(1)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Killed(RuntimeError):
    pass


class KillAt(Callback):
    """Dies (like a SIGKILL, nothing saved) when training reaches ``step`` optimizer steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


class PlainLoaderDM(SyntheticDM):
    """The pre-resumable training loader (for the control test)."""

    def train_dataloader(self):
        x, y = self.split_tensors("train")
        return DataLoader(
            TensorDataset(x, y),
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=True,
        )


DM_KW = dict(n=52, val_size=8, batch_size=8, seed=7)  # 44 train images: 5 batches of 8
EPOCHS, PER_EPOCH = 3, 5


def _fit(root, dm_cls=SyntheticDM, kill_at=None, ckpt_path=None, num_workers=0, ckpt=None):
    """One trainer.fit in a fresh data module / model; returns (model, caught warnings)."""
    torch.manual_seed(0)
    dm = dm_cls(num_workers=num_workers, **DM_KW)
    model = Recorder(DM_KW["n"])
    # the repo's last_checkpoint callback, every step
    ckpt = ckpt or dict(every_n_train_steps=1, save_top_k=0, save_on_train_epoch_end=False)
    callbacks = [ModelCheckpoint(dirpath=root, save_last=True, monitor=None, **ckpt)]
    if kill_at is not None:
        callbacks.append(KillAt(kill_at))
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kill_at is None:
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
        else:
            with pytest.raises(Killed):
                trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    return model, [str(w.message) for w in caught]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        ea == eb and ia == ib and torch.equal(ya, yb) and torch.equal(xa, xb)
        for (ea, ia, ya, xa), (eb, ib, yb, xb) in zip(a, b)
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model, _ = _fit(tmp_path_factory.mktemp("full"))
    assert len(model.seen) == EPOCHS * PER_EPOCH
    labels = [torch.cat([s[2] for s in model.seen[e * 5 : e * 5 + 5]]) for e in range(EPOCHS)]
    assert not torch.equal(labels[0], labels[1])  # each epoch in its own order
    return model.seen


@pytest.mark.parametrize(
    "kill_at,num_workers,ckpt",
    [
        pytest.param(2, 0, None, id="mid-epoch0"),
        pytest.param(8, 0, None, id="mid-epoch1"),
        pytest.param(5, 0, None, id="after-last-batch-of-epoch0"),
        pytest.param(
            10,
            0,
            dict(every_n_epochs=1, save_top_k=1, save_on_train_epoch_end=True),
            id="epoch-end-ckpt",
        ),
        pytest.param(7, 2, None, id="mid-epoch1-2workers"),
    ],
)
def test_trainer_resume_sees_the_same_batches(tmp_path, uninterrupted, kill_at, num_workers, ckpt):
    killed, _ = _fit(tmp_path, kill_at=kill_at, num_workers=num_workers, ckpt=ckpt)
    assert _same(killed.seen, uninterrupted[:kill_at])
    last = tmp_path / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == kill_at
    state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    epoch, done = divmod(kill_at, PER_EPOCH)
    if done == 0:  # saved after the last batch of the previous epoch
        epoch, done = epoch - 1, PER_EPOCH
    # the loader's count is the number of batches trained on (no read-ahead)
    assert state == [{"epoch": epoch, "batches_done": done, "seed": 7}]

    resumed, messages = _fit(tmp_path, ckpt_path=last, num_workers=num_workers, ckpt=ckpt)
    assert not [m for m in messages if NOT_RESUMABLE in m]
    assert _same(resumed.seen, uninterrupted[kill_at:])


def test_control_plain_loader_is_not_resumed(tmp_path):
    """The checks above can fail: the old plain loader restarts its epoch (and Lightning
    warns), so the resumed batches differ from the uninterrupted run's."""
    full, _ = _fit(tmp_path / "full", dm_cls=PlainLoaderDM)
    killed, _ = _fit(tmp_path, dm_cls=PlainLoaderDM, kill_at=2)
    assert _same(killed.seen, full.seen[:2])
    resumed, messages = _fit(tmp_path, dm_cls=PlainLoaderDM, ckpt_path=tmp_path / "last.ckpt")
    assert [m for m in messages if NOT_RESUMABLE in m]
    assert len(resumed.seen) == len(full.seen) - 2
    assert not _same(resumed.seen, full.seen[2:])


def test_control_resume_without_the_loader_state_differs(tmp_path, uninterrupted, monkeypatch):
    """Dropping the restored loader state breaks the equality the main test asserts."""
    _fit(tmp_path, kill_at=8)
    monkeypatch.setattr(ResumableLoader, "load_state_dict", lambda self, state: None)
    resumed, _ = _fit(tmp_path, ckpt_path=tmp_path / "last.ckpt")
    assert not _same(resumed.seen, uninterrupted[8:])
