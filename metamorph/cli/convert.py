"""``metamorph-convert``: import a foreign checkpoint into metamorph's safetensors + JSON format."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from metamorph.cli.entry import entry_point
from metamorph.io.model_file import save_model
from metamorph.models import fold_batchnorm
from metamorph.runtime.networks import load_any_model
from metamorph.runtime.summary import print_summary
from metamorph.utils.profile import count_params


def run(cfg: DictConfig) -> dict:
    src = Path(cfg.src)
    model = load_any_model(src)
    if cfg.fold_bn:
        fold_batchnorm(model.eval())
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = save_model(model, out, meta={"source": src.name, "folded": bool(cfg.fold_bn)})
    return {
        "src": str(src),
        "out": str(json_path),
        "weights": str(json_path.with_suffix(".safetensors")),
        "depth": model.arch.depth,
        "params": count_params(model),
        "normalization": {"mean": model.arch.mean, "std": model.arch.std},
    }


@entry_point("metamorph-convert", "convert", tee_log=True)
def main(cfg: DictConfig) -> None:
    summary = run(cfg)
    print(
        f"[metamorph-convert] {summary['src']} -> {summary['out']} (ResNet-{summary['depth']}, {summary['params']:,} params)"
    )
    print_summary(summary)


if __name__ == "__main__":
    main()
