"""Deployment formats for a materialised network: ONNX (checked with onnxruntime) and
``torch.export`` programs."""

from __future__ import annotations

import importlib.util
import io
import os
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
from torch import nn

FORMATS = ("safetensors", "onnx", "export")


def _random_batch(model: nn.Module, batch: int, seed: int) -> torch.Tensor:
    in_ch = model.arch.in_channels if hasattr(model, "arch") else 3
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(batch, in_ch, 32, 32, generator=g)


def onnx_exporter(requested: str = "auto") -> str:
    """``dynamo`` (needs onnxscript) or ``legacy`` (TorchScript-based, ``dynamo=False``)."""
    has_onnxscript = importlib.util.find_spec("onnxscript") is not None
    if requested == "auto":
        return "dynamo" if has_onnxscript else "legacy"
    if requested == "dynamo" and not has_onnxscript:
        raise ValueError(
            "onnx.exporter=dynamo needs the onnxscript package (pip install onnxscript); "
            "use onnx.exporter=legacy or auto"
        )
    if requested not in ("dynamo", "legacy"):
        raise ValueError(f"unknown onnx.exporter {requested!r}; choose auto, dynamo or legacy")
    return requested


def export_onnx(
    model: nn.Module, path: str | os.PathLike, opset: int = 17, exporter: str = "auto"
) -> str:
    """Write ``model`` as ONNX with a dynamic batch axis (input ``input``, output ``logits``).
    Returns the exporter used."""
    if importlib.util.find_spec("onnx") is None:
        raise ValueError("format=onnx needs the onnx package: pip install 'metamorph[export]'")
    kind = onnx_exporter(exporter)
    model = model.eval().cpu()
    x = _random_batch(model, 2, 0)
    kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=int(opset))
    sink = io.StringIO()
    with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
        warnings.simplefilter("ignore")
        if kind == "legacy":
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                **kwargs,
            )
        else:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(
                model, (x,), str(path), dynamo=True, dynamic_shapes={"x": {0: batch}}, **kwargs
            )
    return kind


def check_onnx(path: str | os.PathLike, model: nn.Module, batch: int = 8, seed: int = 0) -> float:
    """Run the ONNX file with onnxruntime on a random batch; max |logit difference| vs PyTorch."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise ValueError(
            "checking the ONNX export needs onnxruntime: pip install 'metamorph[export]'"
        )
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = _random_batch(model, batch, seed)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model.eval().cpu()(x)
    return float((torch.from_numpy(got) - ref).abs().max())


def export_program(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a ``torch.export`` program (``torch.export.save``) with a dynamic batch axis."""
    model = model.eval().cpu()
    x = _random_batch(model, 2, 0)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))


def check_program(
    path: str | os.PathLike, model: nn.Module, batch: int = 8, seed: int = 0
) -> float:
    """Load the saved program back; max |logit difference| vs ``model`` on a random batch."""
    program = torch.export.load(str(Path(path)))
    x = _random_batch(model, batch, seed)
    with torch.no_grad():
        got = program.module()(x)
        ref = model.eval().cpu()(x)
    return float((got - ref).abs().max())
