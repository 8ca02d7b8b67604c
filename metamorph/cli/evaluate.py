"""``metamorph-eval``: accuracy, parameters, FLOPs and CPU latency of a model on a data split."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from metamorph.cli.common import CONF_DIR, build_datamodule, load_any_model, print_summary
from metamorph.utils.profile import count_flops, count_params, cpu_latency_ms


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_eval_model(path: str) -> nn.Module:
    """Model files and foreign checkpoints, or a pretrain Lightning checkpoint (weights_only)."""
    p = Path(path)
    if p.suffix == ".ckpt":
        from omegaconf import OmegaConf

        from metamorph.cli.common import build_model

        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
        if cfg.task.name != "pretrain":
            raise ValueError(
                f"{p} is a task={cfg.task.name} checkpoint; evaluate it with its own tools"
            )
        model_cfg = cfg.model
        model_cfg.init = None
        net = build_model(model_cfg, num_classes=None)
        state = {
            k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")
        }
        net.load_state_dict(state)
        return net.eval()
    return load_any_model(p).eval()


@torch.no_grad()
def accuracy(model: nn.Module, dm, split: str, device: torch.device) -> tuple[float, int]:
    model = model.to(device).eval()
    correct = total = 0
    for x, y in dm.normalized_batches(split, device=device):
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    return correct / max(1, total), total


def run(cfg: DictConfig) -> dict:
    t0 = time.time()
    model = load_eval_model(cfg.src)
    dm = build_datamodule(cfg.data, mean=model.arch.mean, std=model.arch.std, seed=cfg.seed)
    dm.setup("test" if cfg.split == "test" else "fit")
    if dm.num_classes != model.arch.num_classes:
        raise ValueError(
            f"model has {model.arch.num_classes} classes but {cfg.data.name} has {dm.num_classes}"
        )
    device = resolve_device(cfg.device)
    acc, n = accuracy(model, dm, cfg.split, device)
    model = model.cpu()
    summary = {
        "src": str(cfg.src),
        "split": cfg.split,
        "images": n,
        "acc": round(100 * acc, 3),
        "params": count_params(model),
        "flops": count_flops(model),
    }
    if cfg.latency:
        for bs in cfg.latency_batch_sizes:
            summary[f"latency_ms_bs{bs}"] = round(cpu_latency_ms(model, bs, cfg.latency_threads), 3)
    summary["time_s"] = round(time.time() - t0, 1)
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    s = run(cfg)
    print(f"[metamorph-eval] {s['src']} on {cfg.data.name}/{s['split']} ({s['images']} images)")
    print(f"  accuracy {s['acc']:.2f}%  params {s['params']:,}  FLOPs {s['flops'] / 1e6:.1f} M")
    for k, v in s.items():
        if k.startswith("latency"):
            print(f"  {k} {v}")
    print_summary(s)


if __name__ == "__main__":
    main()
