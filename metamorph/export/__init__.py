"""Turning a metamorphic checkpoint into deployable networks: sampling by ratio, shape or budget
(:mod:`.sample`), ONNX and ``torch.export`` formats (:mod:`.formats`), all-or-nothing output
writes (:mod:`.outputs`) and accuracy/cost sweeps across ratios (:mod:`.sweep`)."""

from metamorph.export.formats import check_onnx, check_program, export_onnx, export_program
from metamorph.export.outputs import StagedOutputs, check_output_dir
from metamorph.export.sample import (
    Budget,
    Candidate,
    candidate_shapes,
    load_metamorphic,
    materialize,
    parse_hidden,
    select_for_budget,
    shape_for_target,
)

__all__ = [
    "Budget",
    "Candidate",
    "StagedOutputs",
    "candidate_shapes",
    "check_onnx",
    "check_output_dir",
    "check_program",
    "export_onnx",
    "export_program",
    "load_metamorphic",
    "materialize",
    "parse_hidden",
    "select_for_budget",
    "shape_for_target",
]
