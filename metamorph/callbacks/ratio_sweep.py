"""``RatioSweep``: accuracy of a metamorphic network across compression ratios after validation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L

from metamorph.hypernet.evaluate import (
    SweepPoint,
    accuracy_at,
    count_shape_params,
    random_shapes,
    sweep_points,
)


def plot_sweep(
    points: list[SweepPoint], path: Path, trained: tuple[float, float] | None, title: str = ""
) -> Path:
    """Accuracy vs gamma, seen and unseen marked, the trained range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    uni = sorted((p for p in points if p.label.startswith("g")), key=lambda p: p.gamma)
    if trained is not None:
        ax.axvspan(trained[0], trained[1], color="0.9", label="trained range")
    if uni:
        ax.plot([p.gamma for p in uni], [p.acc for p in uni], "-", color="C0", alpha=0.6)
        seen = [p for p in uni if p.seen]
        unseen = [p for p in uni if not p.seen]
        ax.plot([p.gamma for p in seen], [p.acc for p in seen], "o", color="C0", label="seen")
        ax.plot(
            [p.gamma for p in unseen],
            [p.acc for p in unseen],
            "s",
            mfc="none",
            color="C3",
            label="unseen",
        )
    others = [p for p in points if not p.label.startswith("g")]
    for p in others:
        ax.plot([p.gamma], [p.acc], "^", color="C2")
        ax.annotate(p.label, (p.gamma, p.acc), fontsize=7)
    ax.set_xlabel("compression ratio $\\gamma = 1 - d/d_{full}$")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_table(points: list[SweepPoint], csv_path: Path) -> str:
    """CSV next to a markdown table (returned)."""
    rows = [p.to_dict() for p in points]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(
            fh, fieldnames=["label", "gamma", "seen", "acc", "params", "depth", "hidden"]
        )
        w.writeheader()
        for r in rows:
            w.writerow({**r, "hidden": json.dumps(r["hidden"])})
    lines = ["| shape | gamma | seen | acc (%) | params |", "|---|---|---|---|---|"]
    for p in points:
        acc = "n/a" if p.acc is None else f"{p.acc:.2f}"
        lines.append(
            f"| {p.label} | {p.gamma:.3f} | {'seen' if p.seen else 'unseen'} | {acc} | {p.params:,} |"
        )
    return "\n".join(lines)


class RatioSweep(L.Callback):
    """After each validation (and at test), evaluate the configured shapes.

    Logs ``{stage}/acc@<label>`` metrics (e.g. ``val/acc@g0.25``), writes a CSV and a PNG plot
    to ``<run dir>/sweep/`` and sends the table to loggers that accept tables (wandb).
    ``k`` and ``max_batches`` (a seeded subset of ``max_batches`` evaluation batches) apply to
    validation sweeps only; the test sweep uses the whole test split and the module's ``eval_k``.
    """

    def __init__(
        self,
        gammas: list[float] = (0.0, 0.25, 0.5, 0.75),
        depths: list[int] = (),
        widths_above: list[float] = (),
        random_shapes: int = 0,
        k: int | None = None,
        every_n_epochs: int = 1,
        max_batches: int | None = None,
    ) -> None:
        self.gammas = list(gammas)
        self.depths = list(depths)
        self.widths_above = list(widths_above)
        self.n_random = random_shapes
        self.k = k
        self.every = max(1, every_n_epochs)
        self.max_batches = max_batches
        self.last: list[SweepPoint] = []

    def points(self, module) -> list[SweepPoint]:
        net = module.net
        custom = (
            random_shapes(net, self.n_random, seed=0, depth=bool(net.spec.depth_choices))
            if self.n_random
            else []
        )
        return sweep_points(net, self.gammas, self.depths, self.widths_above, custom)

    def run(self, trainer: L.Trainer, module, stage: str) -> list[SweepPoint]:
        dm = trainer.datamodule
        split = "val" if stage == "val" else "test"
        pts = self.points(module)
        was_training = module.training
        module.eval()
        # Validation sweeps may use a seeded, class-balanced-in-expectation subset (the splits are
        # stored class by class, so the first batches would hold one or two classes only) and
        # their own K; the test sweep always uses the whole test split and the module's eval K.
        data = split
        if stage == "val" and self.max_batches is not None:
            data = dm.subset(split, self.max_batches * dm.eval_batch_size, seed=0)
        k = self.k if stage == "val" else None
        for p in pts:
            emitted = module.emit_eval(p.hidden, k=k)
            batches = dm.normalized_batches(data, device=module.device)
            p.acc = accuracy_at(module.net, emitted, p.hidden, batches)
            p.params = count_shape_params(module.net, p.hidden)
        module.train(was_training)
        for p in pts:
            module.log(f"{stage}/acc@{p.label}", p.acc, on_epoch=True)
        out = Path(trainer.default_root_dir) / "sweep"
        tag = f"{stage}_epoch{trainer.current_epoch:03d}" if stage == "val" else "test"
        table = write_table(pts, out / f"{tag}.csv")
        spec = module.net.spec
        plot_sweep(
            pts,
            out / f"{tag}.png",
            (1 - spec.max_width_ratio, 1 - spec.min_width_ratio),
            title=f"{stage} accuracy vs compression",
        )
        for lg in trainer.loggers:
            if hasattr(lg, "log_table"):
                lg.log_table(
                    key=f"{stage}/sweep",
                    columns=["label", "gamma", "seen", "acc"],
                    data=[[p.label, p.gamma, p.seen, p.acc] for p in pts],
                )
        self.last = pts
        self.last_table = table
        return pts

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every != 0:
            return
        self.run(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self.run(trainer, pl_module, "test")
