"""The model house: single-entry / single-exit segments of the teacher and the alternatives that
may replace them.

Segments come from the teacher's traced graph (``torch.fx``, residual blocks kept as leaves): a
cut between two blocks is a valid segment boundary when exactly one value is live across it, so a
segment ``[a, b)`` (global block indices) takes one tensor in and gives one out. Segments stay
within a stage (the stage boundary changes width and resolution; every alternative here keeps the
stage's entry block where it needs one, so no adapter is needed and none is built).

An alternative is a JSON spec (:class:`AltSpec`) that :func:`build_alternative` turns into an
``nn.Sequential`` of residual blocks, so a student assembled from them is a plain CIFAR ResNet:

- ``teacher_run``: a shorter contiguous run of the segment's own blocks (length 0 = identity);
- ``public_run``: a run of a public network's blocks at the same stage (akamaster ResNet-20/32/44);
- ``pruned``: the segment with each block's hidden channels cut to a ratio (L1 criterion);
- ``lowrank``: the segment with every 3x3 conv Tucker-2 decomposed at a rank ratio;
- ``identity`` and ``dwsep`` (the LANA baseline's hand-designed kinds, :mod:`.lana`): the segment
  dropped (where shapes allow), and the segment with every 3x3 conv depthwise-separable.

Shapes: a segment that starts a stage other than the first begins with a stride-2 block that
changes width, so its alternatives start with a stage-entry block too; other segments map a
``(C, H, W)`` activation to itself and take only non-entry blocks.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from metamorph.models.lowrank import decompose_conv
from metamorph.models.pruning import prune_to_widths
from metamorph.models.resnet_cifar import BasicBlock, CifarResNet
from metamorph.models.segments import block_names, block_position

PUBLIC_FILES = {
    "resnet20": "resnet20-*.th",
    "resnet32": "resnet32-*.th",
    "resnet44": "resnet44-*.th",
}


@dataclass(frozen=True)
class Segment:
    """Blocks ``[start, stop)`` (global indices, forward order) of one stage of the teacher."""

    stage: int  # 0-based
    start: int
    stop: int
    entry: bool  # starts a stage > 0 (its first block has stride 2 and widens)

    @property
    def length(self) -> int:
        return self.stop - self.start

    @property
    def id(self) -> str:
        return f"s{self.stage + 1}_{self.start}-{self.stop}"

    def overlaps(self, other: Segment) -> bool:
        return self.start < other.stop and other.start < self.stop


@dataclass
class AltSpec:
    """How to build one alternative for ``segment`` (JSON-serialisable, rebuilt the same way)."""

    segment: list[int]  # [start, stop) in the teacher
    kind: str
    source: str = "teacher"  # teacher | resnet20 | resnet32 | resnet44
    blocks: list[int] = field(default_factory=list)  # the source's blocks in its stage (0-based)
    ratio: float | None = None  # keep ratio (pruned) or rank ratio (lowrank)

    @property
    def id(self) -> str:
        a, b = self.segment
        base = f"{a}-{b}_{self.kind}_{self.source}"
        if self.blocks:
            base += f"_b{self.blocks[0]}-{self.blocks[-1] + 1}"
        elif self.kind == "teacher_run":
            base += "_empty"
        if self.ratio is not None:
            base += f"_r{self.ratio:g}"
        return base

    def to_dict(self) -> dict:
        return asdict(self)


class _BlockTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, BasicBlock) or super().is_leaf_module(m, qualname)


def trace_blocks(model: CifarResNet) -> fx.Graph:
    """The teacher's graph with every residual block as one ``call_module`` node."""
    return _BlockTracer().trace(model, concrete_args={"start": None, "stop": None})


def single_value_cuts(graph: fx.Graph) -> dict[str, bool]:
    """For every block node, whether exactly one value (its own input) is live just before it and
    exactly one (its output) just after: the boundaries a segment may start or end at."""
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((pos[u] for u in n.users), default=pos[n]) for n in nodes}

    def live_across(i: int) -> set:  # values defined at or before i and used after i
        return {n for n in nodes[: i + 1] if last_use[n] > i}

    out = {}
    for i, n in enumerate(nodes):
        if n.op == "call_module" and n.target.startswith("layer") and n.target.count(".") == 1:
            before, after = live_across(i - 1), live_across(i)
            out[n.target] = len(before) == 1 and len(after) == 1
    return out


def enumerate_segments(model: CifarResNet, min_len: int = 1, max_len: int = 4) -> list[Segment]:
    """Every within-stage run of ``min_len..max_len`` blocks whose boundaries are single-value
    cuts of the traced graph."""
    if min_len < 1 or max_len < min_len:
        raise ValueError(
            f"house.min_len={min_len}, max_len={max_len}: need 1 <= min_len <= max_len"
        )
    cuts = single_value_cuts(trace_blocks(model))
    names = block_names(model.arch)
    missing = [n for n in names if n not in cuts]
    if missing:
        raise ValueError(f"the traced graph has no node for blocks {missing[:3]}")
    segs = []
    for a, name in enumerate(names):
        s, b = block_position(name)
        for length in range(min_len, max_len + 1):
            stop = a + length
            if stop > len(names) or block_position(names[stop - 1])[0] != s:
                break
            if all(cuts[names[i]] for i in range(a, stop)):
                segs.append(Segment(s, a, stop, entry=(s > 0 and b == 0)))
    return segs


def segment_of(spec: AltSpec, model: CifarResNet) -> Segment:
    a, b = spec.segment
    names = block_names(model.arch)
    s, first = block_position(names[a])
    return Segment(s, a, b, entry=(s > 0 and first == 0))


# ----------------------------------------------------------------------------------------------
# Sources and candidate alternatives
# ----------------------------------------------------------------------------------------------


def public_path(name: str, folder: str | Path) -> Path:
    """The akamaster checkpoint of public network ``name`` in ``folder`` (clear error if absent)."""
    if name not in PUBLIC_FILES:
        raise ValueError(f"unknown public network {name!r}; choose from {sorted(PUBLIC_FILES)}")
    folder = Path(folder)
    found = sorted(folder.glob(PUBLIC_FILES[name])) if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"public network {name}: no {PUBLIC_FILES[name]} in {folder}. Point "
            "task.house.public_dir= at the akamaster-cifar10 folder, or exclude public sources "
            "with task.house.public=[] (or drop public_run from task.house.kinds)"
        )
    return found[0]


def load_public(names: list[str], folder: str | Path | None) -> dict[str, CifarResNet]:
    """The public networks by name (akamaster files, loaded weights-only by the converter)."""
    from metamorph.io.akamaster import akamaster_to_metamorph, load_untrusted_checkpoint

    if names and folder is None:
        raise ValueError(
            "task.house.public_dir is not set but task.house.public names "
            f"{list(names)}; set the folder or use task.house.public=[]"
        )
    out = {}
    for n in names:
        out[n] = akamaster_to_metamorph(load_untrusted_checkpoint(public_path(n, folder)))[0]
    return out


def _stage_blocks(model: CifarResNet, stage: int) -> int:
    return len(model.arch.hidden[stage])


def _runs(n_blocks: int, max_len: int, entry: bool, stage: int, min_len: int = 1):
    """Contiguous runs ``[a, a+k)`` of a stage with ``n_blocks`` blocks, shape-compatible with a
    segment (``entry``: must start with the stage's stride-2 block)."""
    for k in range(min_len, max_len + 1):
        for a in range(n_blocks - k + 1):
            if entry and a != 0:
                continue
            if not entry and stage > 0 and a == 0:
                continue
            yield list(range(a, a + k))


def candidate_specs(
    seg: Segment,
    teacher: CifarResNet,
    public: dict[str, CifarResNet],
    kinds: list[str],
    keep_ratios: list[float],
    rank_ratios: list[float],
) -> dict[str, list[AltSpec]]:
    """Every alternative of ``seg`` by kind (each cheaper than the segment itself)."""
    sp = [seg.start, seg.stop]
    first = seg.start - sum(len(h) for h in teacher.arch.hidden[: seg.stage])
    own = list(range(first, first + seg.length))
    out: dict[str, list[AltSpec]] = {k: [] for k in kinds}
    if "teacher_run" in kinds:
        # shorter runs inside the segment; the empty run (identity) only where shapes allow
        lo = 1 if seg.entry else 0
        for k in range(lo, seg.length):
            for a in range(seg.length - k + 1):
                run = own[a : a + k]
                if seg.entry and run[0] != 0:
                    continue
                if not seg.entry and seg.stage > 0 and run and run[0] == 0:
                    continue
                out["teacher_run"].append(AltSpec(sp, "teacher_run", "teacher", run))
    if "public_run" in kinds:
        for name, net in public.items():
            if net.arch.stage_widths != teacher.arch.stage_widths:
                raise ValueError(
                    f"public network {name} has stage widths {net.arch.stage_widths}, the teacher "
                    f"{teacher.arch.stage_widths}: its blocks do not fit; drop it from "
                    "task.house.public"
                )
            n = _stage_blocks(net, seg.stage)
            for run in _runs(n, min(seg.length - 1, n), seg.entry, seg.stage):
                out["public_run"].append(AltSpec(sp, "public_run", name, run))
    if "pruned" in kinds:
        for r in keep_ratios:
            out["pruned"].append(AltSpec(sp, "pruned", "teacher", own, float(r)))
    if "lowrank" in kinds:
        for r in rank_ratios:
            out["lowrank"].append(AltSpec(sp, "lowrank", "teacher", own, float(r)))
    if "identity" in kinds and not seg.entry:
        out["identity"].append(AltSpec(sp, "identity", "teacher", []))
    if "dwsep" in kinds:
        out["dwsep"].append(AltSpec(sp, "dwsep", "teacher", own))
    return {k: v for k, v in out.items() if v}


def sample_house(
    teacher: CifarResNet,
    public: dict[str, CifarResNet],
    segments: list[Segment],
    per_segment: int,
    max_segments: int,
    kinds: list[str],
    keep_ratios: list[float],
    rank_ratios: list[float],
    seed: int = 0,
    sample: bool = True,
) -> list[AltSpec]:
    """K alternatives per segment (a kind drawn uniformly, then one of its candidates), for
    ``max_segments`` segments drawn at random (0: all); seeded, so a rerun builds the same house.
    ``sample=False``: every candidate of every (drawn) segment, ``per_segment`` unused."""
    if sample and per_segment < 1:
        raise ValueError(f"house.per_segment={per_segment} must be at least 1")
    rng = random.Random(seed)
    segs = list(segments)
    if max_segments and max_segments < len(segs):
        segs = sorted(rng.sample(segs, max_segments), key=lambda s: (s.start, s.stop))
    specs: list[AltSpec] = []
    for seg in segs:
        pool = candidate_specs(seg, teacher, public, kinds, keep_ratios, rank_ratios)
        if not sample:
            specs += [sp for k in sorted(pool) for sp in pool[k]]
            continue
        for _ in range(per_segment):
            live = [k for k in sorted(pool) if pool[k]]
            if not live:
                break
            kind = rng.choice(live)
            specs.append(pool[kind].pop(rng.randrange(len(pool[kind]))))
    return specs


# ----------------------------------------------------------------------------------------------
# Building an alternative
# ----------------------------------------------------------------------------------------------


def _block(net: CifarResNet, stage: int, index: int) -> BasicBlock:
    return net.get_submodule(f"layer{stage + 1}").__getitem__(index)


@torch.no_grad()
def build_alternative(
    spec: AltSpec, teacher: CifarResNet, public: dict[str, CifarResNet]
) -> nn.Sequential:
    """The alternative's blocks (deep copies, initialised from their source) as a Sequential."""
    seg = segment_of(spec, teacher)
    if spec.source == "teacher":
        src = teacher
    elif spec.source in public:
        src = public[spec.source]
    else:
        raise ValueError(
            f"alternative {spec.id} takes blocks from {spec.source}, which is not loaded; "
            "list it in task.house.public"
        )
    if spec.kind in ("teacher_run", "public_run", "identity"):
        blocks = [copy.deepcopy(_block(src, seg.stage, i)) for i in spec.blocks]
    elif spec.kind == "dwsep":
        from metamorph.methods.bespoke.lana import dwsep_block

        blocks = [dwsep_block(_block(teacher, seg.stage, i)) for i in spec.blocks]
    elif spec.kind == "pruned":
        names = [f"layer{seg.stage + 1}.{i}" for i in spec.blocks]
        widths = {
            n: max(1, round(teacher.arch.hidden[seg.stage][i] * spec.ratio))
            for n, i in zip(names, spec.blocks)
        }
        small, _ = prune_to_widths(teacher, widths, criterion="l1")
        blocks = [copy.deepcopy(small.get_submodule(n)) for n in names]
    elif spec.kind == "lowrank":
        blocks = []
        for i in spec.blocks:
            blk = copy.deepcopy(_block(teacher, seg.stage, i))
            for cname in ("conv1", "conv2"):
                conv = getattr(blk, cname)
                r_in = max(1, round(conv.in_channels * spec.ratio))
                r_out = max(1, round(conv.out_channels * spec.ratio))
                setattr(blk, cname, decompose_conv(conv, r_in, r_out))
            blocks.append(blk)
    else:
        raise ValueError(f"unknown alternative kind {spec.kind!r}")
    return nn.Sequential(*blocks).float()


def self_replacement(seg: Segment, teacher: CifarResNet) -> AltSpec:
    """The segment's own blocks as an alternative (replacing a segment by itself)."""
    first = seg.start - sum(len(h) for h in teacher.arch.hidden[: seg.stage])
    return AltSpec(
        [seg.start, seg.stop], "teacher_run", "teacher", list(range(first, first + seg.length))
    )


def write_house(path: Path, meta: dict, specs: list[AltSpec]) -> None:
    from metamorph.io.atomic import atomic_write_text

    atomic_write_text(
        path, json.dumps({**meta, "alternatives": [s.to_dict() for s in specs]}, indent=1)
    )


def read_house(path: str | Path) -> tuple[dict, list[AltSpec]]:
    path = Path(path)
    if path.is_dir():
        path = path / "house.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: bespoke.house= is the run folder task=bespoke_preprocess wrote"
        )
    d = json.loads(path.read_text())
    return d, [AltSpec(**a) for a in d.pop("alternatives")]
