"""Auxiliary models and the distillation that extracts learngene instances from the ancestry.

An auxiliary model is the ancestry with reduced width (stage widths times ``width``) and reduced
depth (``blocks`` in total, spread evenly over the stages). It is trained from random init with
the paper's loss (official code, ``criterion2.py``; alpha = 0.1, T = 1)::

    L = a CE(z_s, y) + (1 - a) (L_logit + L_rep [+ L_att])
    L_logit = mean over batch x classes of -softmax(z_t / T) log_softmax(z_s / T)
    L_rep   = sum_k MSE(h_s[i_k], M_k(h_t[j_k]))          block outputs
    L_att   = sum_k MSE(a_s[i_k], A_k(a_t[j_k]))          attention outputs (ViT blocks only)

``M_k`` / ``A_k`` are the *transformation layers* (teacher width -> student width; a 1x1 conv for
ResNets, a linear map for ViTs) at the supervised positions. They are optimised with the student
(the PyTorch port of the official code leaves them at random init; this does not), and their
learned weights later initialise the pool's stitch layers ("ours": transposed mean).
Positions: ``end`` pairs the last blocks; ``front_end`` the blocks ending each third of the
network (student D/3-1, 2D/3-1, D-1 with teacher T/3-1, 2T/3-1, T-1, the paper's {3, 7, 11} for
a 12-block ancestry), which for CIFAR ResNets are the ends of the three stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metamorph.models.blockseq import as_block_seq
from metamorph.models.resnet_cifar import ResNetArch
from metamorph.models.stitched import make_stitch

POSITIONS = ("end", "front_end")
LOGIT_REDUCTIONS = ("mean", "batchmean")
AUX_INITS = ("random", "ancestry")


def evenly_spaced(n: int, total: int) -> list[int]:
    """``n`` indices of ``range(total)`` spread evenly, first and last included."""
    if n > total:
        raise ValueError(f"cannot pick {n} of {total} blocks")
    if n == 1:
        return [total - 1]
    return [round(i * (total - 1) / (n - 1)) for i in range(n)]


@torch.no_grad()
def inherit_from_ancestry(student: nn.Module, ancestry: nn.Module) -> list[int]:
    """Copy the ancestry's stem, head and evenly spaced blocks (per stage for ResNets) into a
    student of the same width: a depth-reduced ancestry to start the distillation from (an
    option for small budgets; the paper starts from random init). Returns the blocks taken."""
    s, t = as_block_seq(student), as_block_seq(ancestry)
    if list(dict.fromkeys(s.block_dims)) != list(dict.fromkeys(t.block_dims)):
        raise ValueError(
            "task.init=ancestry needs the auxiliary model at the ancestry's width (task.width=1.0); "
            "use task.init=random for reduced widths"
        )
    taken = []
    for stage in sorted(set(s.block_stages)):
        si = [i for i, g in enumerate(s.block_stages) if g == stage]
        ti = [i for i, g in enumerate(t.block_stages) if g == stage]
        taken += [ti[k] for k in evenly_spaced(len(si), len(ti))]
    s.stem.load_state_dict(t.stem.state_dict())
    s.head.load_state_dict(t.head.state_dict())
    for i, j in enumerate(taken):
        s.blocks[i].load_state_dict(t.blocks[j].state_dict())
    return taken


def auxiliary_arch(ancestry: ResNetArch, width: float, blocks: int) -> ResNetArch:
    """The ancestry's architecture with stage widths ``round(width * w)`` and ``blocks`` blocks
    spread evenly over its stages (every hidden width = its stage width)."""
    stages = len(ancestry.stage_widths)
    if blocks < stages or blocks % stages:
        raise ValueError(
            f"an auxiliary ResNet needs a multiple of {stages} blocks (one count per stage); "
            f"got blocks={blocks} (e.g. 6 or 9)"
        )
    if not 0 < width <= 1:
        raise ValueError(f"width={width} must be in (0, 1] (a fraction of the ancestry's widths)")
    widths = [max(1, round(width * w)) for w in ancestry.stage_widths]
    per = blocks // stages
    d = ancestry.to_dict()
    d.update(stage_widths=widths, hidden=[[w] * per for w in widths], block_variants={})
    d.update(bn_blocks=[], bn=True)
    return ResNetArch.from_dict(d)


def auxiliary_vit_arch(ancestry, width: float, blocks: int):
    """A ViT ancestry's architecture with ``blocks`` blocks, embedding ``round(width * D)`` and
    ``round(width * heads)`` heads (head dim kept), the paper's tiny / small / base widths."""
    from metamorph.models.vit import ViTArch

    if not 0 < width <= 1:
        raise ValueError(f"width={width} must be in (0, 1] (a fraction of the ancestry's width)")
    if blocks < 1:
        raise ValueError(f"blocks={blocks} must be at least 1")
    d = ancestry.to_dict()
    heads = max(1, round(width * ancestry.num_heads))
    d.update(embed_dim=heads * (ancestry.embed_dim // ancestry.num_heads), num_heads=heads)
    d.update(depth=int(blocks))
    return ViTArch.from_dict(d)


def auxiliary_network(ancestry: nn.Module, width: float, blocks: int) -> nn.Module:
    """A freshly initialised auxiliary model of the ancestry's family."""
    from metamorph.models.registry import build_from_arch, family_of

    if isinstance(getattr(ancestry, "arch", None), ResNetArch):
        return build_from_arch(
            "cifar_resnet", auxiliary_arch(ancestry.arch, width, blocks).to_dict()
        )
    fam = family_of(ancestry)
    if fam.name == "cifar_vit":
        return build_from_arch(fam.name, auxiliary_vit_arch(ancestry.arch, width, blocks).to_dict())
    raise ValueError(
        f"no auxiliary models for a {fam.name} ancestry; use a CIFAR ResNet or ViT model file"
    )


def supervision_pairs(student_blocks: int, teacher_blocks: int, mode: str) -> list[tuple[int, int]]:
    """``(student block, teacher block)`` pairs whose outputs are matched."""
    if mode not in POSITIONS:
        raise ValueError(f"positions={mode!r}; choose one of {POSITIONS}")
    parts = 1 if mode == "end" else 3
    if mode == "front_end" and (student_blocks < 3 or teacher_blocks < 3):
        raise ValueError("positions=front_end needs at least 3 blocks in student and teacher")
    return [
        (round((k + 1) * student_blocks / parts) - 1, round((k + 1) * teacher_blocks / parts) - 1)
        for k in range(parts)
    ]


class TransformLayers(nn.Module):
    """The learnable maps teacher width -> student width, one per supervised position (``maps``)
    and, for blocks with ``forward_with_attn``, one per position for the attention output
    (``attn_maps``)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs, attention: bool) -> None:
        super().__init__()
        self.pairs = [(int(i), int(j)) for i, j in pairs]
        kind = student.stitch_kind
        for i, j in self.pairs:
            if student.block_stages[i] != teacher.block_stages[j]:
                raise ValueError(
                    f"student block {i} (stage {student.block_stages[i]}) and teacher block {j} "
                    f"(stage {teacher.block_stages[j]}) have different layouts; use positions "
                    "that end the same stage"
                )
        self.maps = nn.ModuleList(
            make_stitch(kind, teacher.block_dims[j], student.block_dims[i]) for i, j in self.pairs
        )
        self.attn_maps = (
            nn.ModuleList(
                make_stitch(kind, teacher.block_dims[j], student.block_dims[i])
                for i, j in self.pairs
            )
            if attention
            else nn.ModuleList()
        )

    def learned_maps(self) -> list[torch.Tensor]:
        """Each block-output map's weight as a ``(student dim, teacher dim)`` matrix."""
        return [m.weight.detach().reshape(m.weight.shape[0], m.weight.shape[1]) for m in self.maps]


def _has_attn(net: nn.Module) -> bool:
    return all(hasattr(b, "forward_with_attn") for b in net.blocks)


def trace(net: nn.Module, x: torch.Tensor, attention: bool):
    """``(block outputs, attention outputs or [], logits)`` of a block-sequence network."""
    h = net.stem(x)
    outs, attns = [], []
    for blk in net.blocks:
        if attention:
            h, a = blk.forward_with_attn(h)
            attns.append(a)
        else:
            h = blk(h)
        outs.append(h)
    return outs, attns, net.head(h)


class AuxDistiller(nn.Module):
    """Student + frozen teacher + transformation layers, and the paper's loss."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        positions: str = "front_end",
        ce_weight: float = 0.1,
        temperature: float = 1.0,
        logit_reduction: str = "mean",
        rep_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.student = as_block_seq(student)
        self.teacher = as_block_seq(teacher).eval().requires_grad_(False)
        if self.student.stitch_kind != self.teacher.stitch_kind:
            raise ValueError("student and teacher must be of the same family (stitch kind)")
        self.attention = _has_attn(self.student) and _has_attn(self.teacher)
        pairs = supervision_pairs(len(self.student.blocks), len(self.teacher.blocks), positions)
        self.transforms = TransformLayers(self.student, self.teacher, pairs, self.attention)
        if not 0 <= ce_weight <= 1:
            raise ValueError(f"ce_weight={ce_weight} must be in [0, 1]")
        self.ce_weight = float(ce_weight)
        self.temperature = float(temperature)
        if logit_reduction not in LOGIT_REDUCTIONS:
            raise ValueError(
                f"logit_reduction={logit_reduction!r}; choose one of {LOGIT_REDUCTIONS}"
            )
        self.logit_reduction = logit_reduction
        self.rep_weight = float(rep_weight)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            t_out, t_att, t_logits = trace(self.teacher, x, self.attention)
        s_out, s_att, s_logits = trace(self.student, x, self.attention)
        t = self.temperature
        ce = F.cross_entropy(s_logits, y)
        logit = -(F.softmax(t_logits / t, 1) * F.log_softmax(s_logits / t, 1))
        logit = logit.mean() if self.logit_reduction == "mean" else logit.sum(1).mean()
        rep = sum(
            F.mse_loss(s_out[i], m(t_out[j]))
            for (i, j), m in zip(self.transforms.pairs, self.transforms.maps)
        )
        att = s_logits.new_zeros(())
        if self.attention:
            att = sum(
                F.mse_loss(s_att[i], m(t_att[j]))
                for (i, j), m in zip(self.transforms.pairs, self.transforms.attn_maps)
            )
        a = self.ce_weight
        total = a * ce + (1 - a) * (logit + self.rep_weight * (rep + att))
        acc = (s_logits.argmax(1) == y).float().mean()
        return total, {"ce": ce, "logit": logit, "rep": rep, "att": att, "acc": acc}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


def student_network(distiller: AuxDistiller) -> nn.Module:
    """The plain student network (a CifarResNet for the ResNet family)."""
    s = distiller.student
    return s.to_resnet() if hasattr(s, "to_resnet") else s


__all__ = [
    "AuxDistiller",
    "POSITIONS",
    "TransformLayers",
    "auxiliary_arch",
    "auxiliary_network",
    "auxiliary_vit_arch",
    "student_network",
    "supervision_pairs",
    "trace",
]
