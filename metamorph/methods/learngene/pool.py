"""The stitched system: members (block-sequence networks, smallest first), the stitch layers
between neighbours, and every descendant they make.

One class serves both methods: a **Learngene pool** (members = the distilled auxiliary models,
whose blocks are the learngene instances) and **SN-Net** (members = independently pretrained
anchors). A descendant runs the first blocks of a smaller member, a stitch layer, then the last
blocks of the next larger member ("from the smaller instances to the larger ones"), or one
member alone. Positions follow SN-Net's paired stitching at equal relative depth: front block
``j`` (0-based, its output) feeds back block ``k`` with ``k`` within one of ``k* = round((j + 1)
* D_back / D_front)``, where the layouts agree (same stage); for two members of equal depth D
this is ``k in {j, j+1, j+2}`` and 3D - 2 positions, the official count (16 for D = 6). The
positions of one front block share one stitch layer (``slot``), so a pair stores D_front layers.

Costs: a descendant's parameters and FLOPs are the sums over its pieces (stem, blocks, stitch,
head), each counted once at its input shape, so the whole table costs one pass per piece;
tests check them against counting the materialised network.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from metamorph.io.model_file import read_pair_json, read_pair_tensors, write_pair
from metamorph.methods.learngene.stitch import (
    INITS,
    init_least_squares,
    init_transposed_mean,
)
from metamorph.models.blockseq import as_block_seq, can_stitch, input_dim, run_blocks
from metamorph.models.registry import build_from_arch
from metamorph.models.stitched import StitchedNet, family_arch, make_stitch, stitched_arch
from metamorph.utils.profile import count_flops, count_params

SYSTEM_FORMAT = "metamorph.learngene_system/v1"


@dataclass(frozen=True)
class Descendant:
    """``members[front][:front_blocks] -> stitches[slot] -> members[back][back_start:]``, or
    ``members[front]`` alone (``back`` None)."""

    id: int
    front: int
    front_blocks: int
    back: int | None = None
    back_start: int | None = None
    slot: str | None = None

    @property
    def stitched(self) -> bool:
        return self.back is not None

    def label(self, names: list[str]) -> str:
        if not self.stitched:
            return names[self.front]
        return f"{names[self.front]}[:{self.front_blocks}]+{names[self.back]}[{self.back_start}:]"

    def to_dict(self) -> dict:
        return asdict(self)


def slot_key(front: int, back: int, j: int) -> str:
    return f"m{front}_m{back}_b{j}"


def enumerate_descendants(members: list[nn.Module]) -> list[Descendant]:
    """Every member alone, then every stitch position of each neighbouring pair (small -> large)."""
    out = [Descendant(i, i, len(m.blocks)) for i, m in enumerate(members)]
    for a in range(len(members) - 1):
        fa, fb = members[a], members[a + 1]
        da, db = len(fa.blocks), len(fb.blocks)
        for j in range(da):
            k_star = round((j + 1) * db / da)
            for k in (k_star - 1, k_star, k_star + 1):
                if 0 <= k <= db - 1 and can_stitch(fa, j, fb, k):
                    out.append(Descendant(len(out), a, j + 1, a + 1, k, slot_key(a, a + 1, j)))
    return out


class StitchedSystem(nn.Module):
    """Members + stitch layers; ``forward(x, d)`` runs descendant ``d`` (an id)."""

    def __init__(self, members: list[nn.Module], names: list[str] | None = None) -> None:
        super().__init__()
        if len(members) < 1:
            raise ValueError("a stitched system needs at least one member")
        self.members = nn.ModuleList(as_block_seq(m) for m in members)
        self.names = list(names or [f"m{i}" for i in range(len(members))])
        if len(self.names) != len(self.members):
            raise ValueError(f"{len(self.names)} names for {len(self.members)} members")
        kinds = {m.stitch_kind for m in self.members}
        if len(kinds) != 1:
            raise ValueError(f"members of one system must be of one stitch kind, got {kinds}")
        self.descendants = enumerate_descendants(list(self.members))
        # per-descendant BatchNorm statistics (state-dict entries of its plain network), set by
        # recalibrate(): the descendants share the members' BN layers, whose running statistics
        # one joint fine-tune leaves right for none of them (docs/results/learngene.md)
        self.bn_stats: dict[int, dict[str, torch.Tensor]] = {}
        self.stitches = nn.ModuleDict()
        for d in self.descendants:
            if d.stitched and d.slot not in self.stitches:
                a, b = self.members[d.front], self.members[d.back]
                self.stitches[d.slot] = make_stitch(
                    a.stitch_kind, a.block_dims[d.front_blocks - 1], input_dim(b, d.back_start)
                )

    @property
    def num_descendants(self) -> int:
        return len(self.descendants)

    def descendant(self, d: int) -> Descendant:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < len(self.descendants):
            raise ValueError(
                f"descendant id {d!r} does not exist: this system has ids 0..{len(self.descendants) - 1}"
            )
        return self.descendants[d]

    def labels(self) -> list[str]:
        return [d.label(self.names) for d in self.descendants]

    def forward(self, x: torch.Tensor, d: int) -> torch.Tensor:
        desc = self.descendant(d)
        front = self.members[desc.front]
        if not desc.stitched:
            return run_blocks(front, x)
        h = run_blocks(front, x, stop=desc.front_blocks)
        h = self.stitches[desc.slot](h)
        return run_blocks(self.members[desc.back], h, start=desc.back_start)

    # ------------------------------------------------------------------------------------------
    # Plain networks and costs
    # ------------------------------------------------------------------------------------------

    def materialize(self, d: int) -> nn.Module:
        """Descendant ``d`` as a plain network (a copy): the member itself (e.g. a CifarResNet)
        or a :class:`~metamorph.models.stitched.StitchedNet`, with its own BatchNorm statistics
        when :meth:`recalibrate` estimated them."""
        net = self._materialize(d)
        if d in self.bn_stats:
            bad = net.load_state_dict(self.bn_stats[d], strict=False).unexpected_keys
            if bad:
                raise ValueError(f"descendant {d}'s BN statistics name unknown entries {bad[:3]}")
        return net

    @torch.no_grad()
    def recalibrate(self, d: int, batches) -> nn.Module:
        """Re-estimate descendant ``d``'s BatchNorm statistics on ``batches`` (normalised training
        images) and keep them for it (saved with the system); returns its plain network."""
        from metamorph.models.calibrate import recalibrate_batchnorm

        net = self._materialize(d)
        self.bn_stats[d] = recalibrate_batchnorm(net, batches)
        return net.eval()

    def _materialize(self, d: int) -> nn.Module:
        desc = self.descendant(d)
        front = self.members[desc.front]
        if not desc.stitched:
            if hasattr(front, "to_resnet"):
                return front.to_resnet().eval()
            return copy.deepcopy(front).eval()
        back, stitch = self.members[desc.back], self.stitches[desc.slot]
        arch = stitched_arch(
            front,
            desc.front_blocks,
            back,
            desc.back_start,
            front.stitch_kind,
            stitch.weight.shape[1],
            stitch.weight.shape[0],
            meta={"descendant": desc.id, "label": desc.label(self.names)},
        )
        net = StitchedNet(arch)
        net.stem.load_state_dict(front.stem.state_dict())
        for i, blk in enumerate(net.front):
            blk.load_state_dict(front.blocks[i].state_dict())
        net.stitch.load_state_dict(stitch.state_dict())
        for i, blk in enumerate(net.back):
            blk.load_state_dict(back.blocks[desc.back_start + i].state_dict())
        net.head.load_state_dict(back.head.state_dict())
        return net.eval()

    @torch.no_grad()
    def costs(self, input_shape=(1, 3, 32, 32)) -> list[dict]:
        """``{"params", "flops"}`` of every descendant, summed from its pieces."""
        pieces = []
        for m in self.members:
            x = torch.zeros(input_shape)
            shapes = [tuple(x.shape)]
            was = m.training
            m.eval()
            h = m.stem(x)
            ins = [tuple(h.shape)]
            for blk in m.blocks:
                h = blk(h)
                ins.append(tuple(h.shape))
            m.train(was)
            pieces.append(
                {
                    "stem": (count_params(m.stem), count_flops(m.stem, shapes[0])),
                    "blocks": [
                        (count_params(b), count_flops(b, ins[i])) for i, b in enumerate(m.blocks)
                    ],
                    "head": (count_params(m.head), count_flops(m.head, ins[-1])),
                    "outs": ins[1:],
                }
            )
        out = []
        for desc in self.descendants:
            f = pieces[desc.front]
            parts = [f["stem"], *f["blocks"][: desc.front_blocks]]
            if desc.stitched:
                b = pieces[desc.back]
                s = self.stitches[desc.slot]
                shape = f["outs"][desc.front_blocks - 1]
                parts += [(count_params(s), count_flops(s, shape)), *b["blocks"][desc.back_start :]]
                parts.append(b["head"])
            else:
                parts.append(f["head"])
            out.append({"params": sum(p for p, _ in parts), "flops": sum(x for _, x in parts)})
        return out

    def stored_params(self) -> dict:
        """Parameters the system stores: members (all blocks, stems, heads) and stitch layers."""
        members = sum(count_params(m) for m in self.members)
        stitches = sum(count_params(s) for s in self.stitches.values())
        return {"members": members, "stitches": stitches, "total": members + stitches}


# ----------------------------------------------------------------------------------------------
# The system file (safetensors + JSON): members' families and archs, descendants, meta
# ----------------------------------------------------------------------------------------------


BN_PREFIX = "descendant_bn."  # <prefix><id>.<state-dict key>: a descendant's own BN statistics


def save_system(system: StitchedSystem, path, meta: dict | None = None):
    members = []
    for name, m in zip(system.names, system.members):
        fam, arch = family_arch(m)
        members.append({"name": name, "family": fam, "arch": arch})
    doc = {
        "format": SYSTEM_FORMAT,
        "members": members,
        "descendants": [d.to_dict() for d in system.descendants],
        "stored_params": system.stored_params(),
        "meta": meta or {},
        "bn_stats_descendants": sorted(system.bn_stats),
    }
    tensors = dict(system.state_dict())
    for d, stats in system.bn_stats.items():
        tensors.update({f"{BN_PREFIX}{d}.{k}": v.contiguous() for k, v in stats.items()})
    return write_pair(path, tensors, doc)


def load_system(path, map_location: str = "cpu") -> StitchedSystem:
    """A system written by :func:`save_system` (never unpickles)."""
    doc = read_pair_json(
        path,
        SYSTEM_FORMAT,
        missing="stitched system file {path} not found (task=learngene_stitch writes <run>/system.json)",
        what="a Learngene / SN-Net system file",
        fix="pass the system.json that task=learngene_stitch wrote",
    )
    members = [build_from_arch(m["family"], m["arch"]) for m in doc["members"]]
    system = StitchedSystem(members, [m["name"] for m in doc["members"]])
    state = read_pair_tensors(path, map_location, hint="; re-run task=learngene_stitch")
    for key in [k for k in state if k.startswith(BN_PREFIX)]:
        d, name = key[len(BN_PREFIX) :].split(".", 1)
        system.bn_stats.setdefault(int(d), {})[name] = state.pop(key)
    system.load_state_dict(state)
    system.meta = doc.get("meta", {})
    return system.eval()


@torch.no_grad()
def initialize_stitches(
    system: StitchedSystem,
    init: str,
    images: torch.Tensor | None = None,
    maps: dict[int, list[torch.Tensor]] | None = None,
) -> dict[str, str]:
    """Initialise every stitch layer: ``snnet`` least squares on ``images`` (normalised, e.g. 100
    training images; the positions sharing a layer are averaged), ``ours`` the transposed mean of
    the front member's learned maps (``maps[member index]``), ``random`` the default init.
    Returns how each layer was set."""
    if init not in INITS:
        raise ValueError(f"init={init!r}; choose one of {INITS}")
    how = {}
    if init == "random":
        return {k: "random" for k in system.stitches}
    if init == "ours":
        for d in system.descendants:
            if d.stitched and d.slot not in how:
                if not maps or not maps.get(d.front):
                    raise ValueError(
                        f"init=ours needs the learned transformation maps of member "
                        f"{system.names[d.front]!r} (an auxiliary model file from "
                        "task=learngene_aux, with its .maps.safetensors); use init=snnet for "
                        "pretrained anchors"
                    )
                init_transposed_mean(system.stitches[d.slot], maps[d.front])
                how[d.slot] = "ours"
        return how
    if images is None or len(images) == 0:
        raise ValueError("init=snnet needs training images for the least-squares fit")
    was = system.training
    system.eval()
    outs = []  # per member: stem output, then every block's output
    for m in system.members:
        h = m.stem(images)
        seq = [h]
        for blk in m.blocks:
            h = blk(h)
            seq.append(h)
        outs.append(seq)
    pairs: dict[str, list] = {}
    for d in system.descendants:
        if d.stitched:
            x = outs[d.front][d.front_blocks]  # output of front block front_blocks - 1
            y = outs[d.back][d.back_start]  # input of back block back_start
            pairs.setdefault(d.slot, []).append((x, y))
    for slot, p in pairs.items():
        init_least_squares(system.stitches[slot], p)
        how[slot] = "snnet"
    system.train(was)
    return how
