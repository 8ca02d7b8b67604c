"""The implicit neural representation (INR) that maps weight coordinates to weight values.

One query is one (row, column) slice of a parameter tensor: a whole k x k kernel for a conv
weight, one value for a bias. Its coordinate is the NeuMeta vector

    [i/L, r/R, c/C, L/N, R/N, C/N]

(tensor index i of L, row r of R, column c of C, sizes normalised by N), Fourier-encoded and
fed to the residual MLP head of that tensor. Outputs are divided by the tensor's fan-in C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# How training emissions draw their coordinate noise: ``query`` (NeuMeta: every query its own
# draw for all six coordinates) or ``axis`` (one draw per row for i, r, L, R and one per column
# for c, C: the input layer keeps its outer-sum form, so noisy emissions skip the per-query
# Fourier features and input matmul).
NOISE_MODES = ("query", "axis")


@dataclass
class INRConfig:
    """Size of the INR heads (NeuMeta's paper INR: hidden 512, layers 8, freqs 32, resmlp)."""

    hidden: int = 256
    layers: int = 4
    freqs: int = 16
    residual_init: float = 0.1  # learnable residual scale s_k at init (0 = the official `mlp` type)
    kernel_out: int = 9  # outputs of a weight query (k*k)
    # How a row/column index is normalised: ``relative`` (NeuMeta: r/R over the emitted size R,
    # so a width is a resampling of one smooth weight field) or ``absolute`` (r over the
    # pretrained size: a channel keeps its coordinate at every width, which is what the anchored
    # variant needs, since its anchor keeps the first d pretrained channels).
    coords: str = "relative"

    def __post_init__(self) -> None:
        if self.coords not in ("relative", "absolute"):
            raise ValueError(f"hypernet.coords={self.coords!r}; choose relative or absolute")


def _cols(slot: TensorSlot, shape: tuple[int, ...]) -> int:
    return shape[1] if slot.kind == "weight" else 1


def fourier_features(x: torch.Tensor, freqs: int) -> torch.Tensor:
    """``[x, sin(2^k pi x), cos(2^k pi x)]`` for k < freqs; (..., d) -> (..., d * (1 + 2 freqs))."""
    if freqs == 0:
        return x
    scales = (2.0 ** torch.arange(freqs, device=x.device, dtype=x.dtype)) * math.pi
    xs = x.unsqueeze(-1) * scales  # (..., d, F)
    return torch.cat([x, xs.sin().flatten(-2), xs.cos().flatten(-2)], dim=-1)


class ResMLPHead(nn.Module):
    """Linear -> ReLU, then residual layers ``x + s_k * relu(W_k x)``, then a linear output."""

    def __init__(
        self, in_dim: int, hidden: int, layers: int, out_dim: int, residual_init: float
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.res = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(max(0, layers - 1)))
        self.scales = nn.Parameter(torch.full((len(self.res),), float(residual_init)))
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.inp(x))

    def trunk(self, pre: torch.Tensor) -> torch.Tensor:
        """Everything after the input layer, from its pre-activation ``pre``."""
        fused = not torch.is_grad_enabled()  # in-place ops only where autograd keeps nothing
        h = pre.relu_() if fused else torch.relu(pre)
        for k, layer in enumerate(self.res):
            r = layer(h)
            if fused:
                h.add_(r.relu_().mul_(self.scales[k]))  # the same rounding as below
            else:
                h = h + self.scales[k] * torch.relu(r)
        return self.out(h)


@dataclass(frozen=True)
class TensorSlot:
    """A metamorphic tensor: its parameter name, global index and kind (``weight``/``bias``)."""

    name: str
    index: int
    kind: str
    kernel: tuple[int, int] = (1, 1)
    full: tuple[int, int] = (1, 1)  # rows, cols of the pretrained tensor (absolute coordinates)


class WeightINR(nn.Module):
    """One residual MLP head per metamorphic tensor, addressed by parameter name.

    ``num_slots`` (L) and ``norm`` (N) are fixed for the life of the INR, so the coordinates of
    a tensor never change meaning when the scope grows or the depth changes.
    """

    # Noise-free emissions on a CPU run the trunk over row blocks of about this many queries, so
    # each block's activations stay in cache between the matmuls and the element-wise ops (about
    # 20% faster at 256 hidden on a 2-core CPU); a GPU takes the whole grid at once.
    grid_chunk: int = 1024
    # :meth:`emit_tensors` stacks the heads of tensors with equal query counts and runs them as
    # batched matmuls (False: one head after the other, the reference path; None: batched on a
    # GPU, where a step is bound by kernel launches, per head on a CPU, where the per-head
    # matmuls are already large and stacking only adds copies -- measured: no faster on the
    # 2-core CPU). Both give bit-identical weights and gradients on the CPU (tested).
    batched: bool | None = None

    def __init__(self, cfg: INRConfig, num_slots: int, norm: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_slots = int(num_slots)
        self.norm = float(norm)
        self.in_dim = 6 * (1 + 2 * cfg.freqs)
        self.heads = nn.ModuleDict()
        self.slots: dict[str, TensorSlot] = {}
        self._grid_cache: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def key(name: str) -> str:
        return name.replace(".", "__")

    def add_slot(self, slot: TensorSlot, init_from: str | None = None) -> None:
        """Add a head for ``slot``; ``init_from`` copies the trained weights of another head."""
        if slot.name in self.slots:
            return
        out_dim = self.cfg.kernel_out if slot.kind == "weight" else 1
        head = ResMLPHead(
            self.in_dim, self.cfg.hidden, self.cfg.layers, out_dim, self.cfg.residual_init
        )
        ref = next(self.parameters(), None)
        if ref is not None:
            head = head.to(ref.device)
        self.heads[self.key(slot.name)] = head
        self.slots[slot.name] = slot
        if init_from is not None:
            self.copy_head(init_from, slot.name)

    @torch.no_grad()
    def copy_head(self, src_name: str, dst_name: str) -> None:
        """Initialise head ``dst_name`` from the trained head ``src_name`` (INR initialisation).

        The copy sees a different constant i/L: the change of its Fourier features is absorbed
        into the first bias, so the new head emits what the source emits at the same shape.
        """
        src, dst = self.slots[src_name], self.slots[dst_name]
        head = self.head(dst_name)
        head.load_state_dict(self.head(src_name).state_dict())
        i = head.inp.weight.new_zeros(2, 6)
        i[0, 0], i[1, 0] = src.index / self.num_slots, dst.index / self.num_slots
        f = fourier_features(i, self.cfg.freqs)
        head.inp.bias.add_(head.inp.weight @ (f[0] - f[1]))

    def head(self, name: str) -> ResMLPHead:
        return self.heads[self.key(name)]

    # ------------------------------------------------------------------ coordinates
    def raw_grid(
        self, slot: TensorSlot, rows: int, cols: int, device: torch.device
    ) -> torch.Tensor:
        """Un-normalised coordinates ``[i, r, c, L, R, C]`` of every query, (rows*cols, 6); cached."""
        key = (slot.name, rows, cols, str(device))
        grid = self._grid_cache.get(key)
        if grid is None:
            r = torch.arange(rows, device=device, dtype=torch.float32)
            c = torch.arange(cols, device=device, dtype=torch.float32)
            rr, cc = torch.meshgrid(r, c, indexing="ij")
            n = rows * cols
            const = torch.tensor(
                [slot.index, self.num_slots, rows, cols], device=device, dtype=torch.float32
            )
            grid = torch.cat(
                [const[0].expand(n, 1), rr.reshape(n, 1), cc.reshape(n, 1), const[1:].expand(n, 3)],
                dim=1,
            ).contiguous()
            self._grid_cache[key] = grid
        return grid

    def normalize(self, raw: torch.Tensor, slot: TensorSlot | None = None) -> torch.Tensor:
        """``[i, r, c, L, R, C] -> [i/L, r/R, c/C, L/N, R/N, C/N]``; with absolute coordinates
        r and c are divided by the pretrained sizes of ``slot`` instead of R and C."""
        if self.cfg.coords == "absolute" and slot is not None:
            den = raw.new_tensor([float(self.num_slots), float(slot.full[0]), float(slot.full[1])])
            return torch.cat([raw[:, :3] / den, raw[:, 3:] / self.norm], dim=1)
        return torch.cat([raw[:, :3] / raw[:, 3:], raw[:, 3:] / self.norm], dim=1)

    def _dens(self, slot: TensorSlot, rows: int, cols: int) -> tuple[float, float]:
        """Divisors of the row and column indices."""
        if self.cfg.coords == "absolute":
            return float(slot.full[0]), float(slot.full[1])
        return float(rows), float(cols)

    # ------------------------------------------------------------------ emission
    def emit_tensor(
        self,
        slot: TensorSlot,
        shape: tuple[int, ...],
        noise: float = 0.0,
        generator: torch.Generator | None = None,
        quirk: bool = False,
    ) -> torch.Tensor:
        """Weights of ``slot`` at ``shape`` ([R, C, kh, kw] or [R])."""
        device = next(self.parameters()).device
        rows = shape[0]
        cols = shape[1] if slot.kind == "weight" else 1
        if noise > 0:
            raw = self.raw_grid(slot, rows, cols, device)
            u = torch.rand(raw.shape, generator=generator, device="cpu").to(device) - 0.5
            raw = raw + noise * u
            if quirk:
                return self._emit_quirk(slot, shape, raw)
            out = self.head(slot.name)(fourier_features(self.normalize(raw, slot), self.cfg.freqs))
        else:
            out = self._emit_grid(slot, rows, cols, device)
        return self._reshape(out, slot, shape) / float(cols)

    def _dim_columns(self, device: torch.device) -> list[torch.Tensor]:
        """For each coordinate dimension d, the input-layer columns its Fourier features feed
        (``fourier_features`` lays out ``[x_0..x_5, sin(d=0, k=0..F-1), ..., cos(...)]``)."""
        key = ("dim_columns", str(device))
        if key not in self._grid_cache:
            f = self.cfg.freqs
            self._grid_cache[key] = [
                torch.tensor(
                    [d]
                    + [6 + d * f + k for k in range(f)]
                    + [6 + 6 * f + d * f + k for k in range(f)],
                    device=device,
                )
                for d in range(6)
            ]
        return self._grid_cache[key]

    def _grid_features(
        self, slot: TensorSlot, rows: int, cols: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fourier features of a grid's constant query (r = c = 0), and those of its rows and of
        its columns minus the features at index 0. They depend only on the coordinates, so they
        are cached: per tensor and shape for the constant query (one row), per index count and
        divisor for the rows and columns (shared by every tensor)."""
        den_r, den_c = self._dens(slot, rows, cols)
        key0 = ("f0", slot.name, rows, cols, str(device), dtype)
        f0 = self._grid_cache.get(key0)
        if f0 is None:
            x0 = torch.tensor(
                [slot.index / self.num_slots, 0.0, 0.0]
                + [self.num_slots / self.norm, rows / self.norm, cols / self.norm],
                device=device,
                dtype=dtype,
            )
            f0 = self._grid_cache[key0] = fourier_features(x0[None], self.cfg.freqs)
        return (
            f0,
            self._axis_features(rows, den_r, device, dtype),
            self._axis_features(cols, den_c, device, dtype),
        )

    def _axis_features(
        self, n: int, den: float, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """``fourier_features(i / den) - fourier_features(0)`` for i < n, (n, 1 + 2F); cached."""
        key = ("axis", n, den, str(device), dtype)
        f = self._grid_cache.get(key)
        if f is None:
            x = torch.arange(n, device=device, dtype=dtype)[:, None] / den
            f = fourier_features(x, self.cfg.freqs)
            f = self._grid_cache[key] = f - f[:1]
        return f

    def _emit_grid(
        self, slot: TensorSlot, rows: int, cols: int, device: torch.device
    ) -> torch.Tensor:
        """Noise-free head outputs over the whole ``rows x cols`` grid, (rows*cols, out).

        The Fourier features of each coordinate enter the input layer linearly, and on a grid
        only r and c vary, so its pre-activation is an outer sum ``A[r] + B[c] + const``: the
        same values as the per-query path, without the per-query features or input matmul.
        """
        head = self.head(slot.name)
        a, b = self._grid_pre(slot, rows, cols, device)
        step = rows
        if device.type == "cpu" and rows * cols > self.grid_chunk:
            step = max(1, self.grid_chunk // cols)  # whole rows per block
        outs = [
            head.trunk((a[i : i + step, None, :] + b[None, :, :]).reshape(-1, a.shape[1]))
            for i in range(0, rows, step)
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _grid_pre(
        self, slot: TensorSlot, rows: int, cols: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise-free input layer's pre-activation as an outer sum: ``a[r] + b[c]``, with
        ``a`` (rows, hidden) zero at r = 0 and ``b`` (cols, hidden) carrying every constant."""
        head = self.head(slot.name)
        w = head.inp.weight
        dims = self._dim_columns(device)
        f0, fr, fc = self._grid_features(slot, rows, cols, device, w.dtype)
        # the query at r = c = 0 through the whole input layer carries every constant term
        base = head.inp(f0)  # (1, hidden)
        a = fr @ w[:, dims[1]].T  # (rows, hidden), zero at r = 0
        b = torch.addmm(base, fc, w[:, dims[2]].T)  # (cols, hidden), the constant folded in
        return a, b

    def _reshape(self, out: torch.Tensor, slot: TensorSlot, shape: tuple[int, ...]) -> torch.Tensor:
        if slot.kind == "bias":
            return out[:, 0].reshape(shape)
        kh, kw = shape[2], shape[3]
        kk = kh * kw
        start = self.cfg.kernel_out // 2 - kk // 2
        return out[:, start : start + kk].reshape(shape)

    def _emit_quirk(
        self, slot: TensorSlot, shape: tuple[int, ...], raw: torch.Tensor
    ) -> torch.Tensor:
        """The official NeuMeta code's behaviour: the head is chosen by ``int(i + u)`` (truncation),
        so about half of the noisy queries of tensor i go to the head of tensor i-1, and the
        output is divided by the noisy fan-in ``C + u``."""
        by_index = {s.index: s for s in self.slots.values()}
        head_ids = raw[:, 0].trunc().long().clamp(min=0)
        feats = fourier_features(self.normalize(raw, slot), self.cfg.freqs)
        out_dim = self.cfg.kernel_out if slot.kind == "weight" else 1
        out = feats.new_zeros(raw.shape[0], self.cfg.kernel_out)
        for hid in head_ids.unique().tolist():
            other = by_index.get(hid, slot)
            mask = head_ids == hid
            y = self.head(other.name)(feats[mask])
            out[mask, : y.shape[1]] = y
        out = out[:, :out_dim] if slot.kind == "bias" else out
        scale = raw[:, 5:6]  # noisy C
        return self._reshape(out / scale, slot, shape)

    # ------------------------------------------------------------------ batched emission
    def emit_tensors(
        self,
        requests: list[tuple[TensorSlot, tuple[int, ...], float]],
        generator: torch.Generator | None = None,
        noise_mode: str = "query",
    ) -> list[torch.Tensor]:
        """Weights of many tensors at once; ``requests`` are ``(slot, shape, noise)``.

        With ``noise_mode="query"`` this equals one :meth:`emit_tensor` call per request, in
        order (the same noise draws from ``generator``), but the heads of requests with equal
        query counts are stacked and their trunks run as batched matmuls: a few large kernels
        per step instead of one small MLP per tensor, in one autograd graph. ``axis`` draws
        the noise per row and per column (:data:`NOISE_MODES`)."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"coordinate noise mode {noise_mode!r}; choose one of {NOISE_MODES}")
        if not requests:
            return []
        device = next(self.parameters()).device
        pres = self._input_pre(requests, generator, noise_mode, device)
        batched = self.batched if self.batched is not None else device.type == "cuda"
        outs: list[torch.Tensor | None] = [None] * len(requests)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, (slot, shape, _) in enumerate(requests):
            out_dim = self.cfg.kernel_out if slot.kind == "weight" else 1
            q = 0 if pres[i] is None else pres[i].shape[0]
            if pres[i] is None:  # noise-free under autograd: the reference grid path
                outs[i] = self._emit_grid(slot, shape[0], _cols(slot, shape), device)
                continue
            groups.setdefault((out_dim, q, self._chunk(q, device)), []).append(i)
        for (_, _, chunk), members in groups.items():
            heads = [self.head(requests[i][0].name) for i in members]
            if len(members) == 1 or not batched:
                for i, head in zip(members, heads):
                    outs[i] = self._trunk(head, pres[i], chunk)
                continue
            ys = self._stacked_trunk(heads, [pres[i] for i in members], chunk)
            for i, y in zip(members, ys):
                outs[i] = y
        result = []
        for (slot, shape, _), out in zip(requests, outs):
            cols = shape[1] if slot.kind == "weight" else 1
            result.append(self._reshape(out, slot, shape) / float(cols))
        return result

    def _input_pre(
        self,
        requests: list[tuple[TensorSlot, tuple[int, ...], float]],
        generator: torch.Generator | None,
        noise_mode: str,
        device: torch.device,
    ) -> list[torch.Tensor]:
        """Each request's input-layer pre-activation, (queries, hidden). Noise is drawn on the
        CPU in request order (what :meth:`emit_tensor` draws) and copied to ``device`` once;
        the per-query Fourier features of all noisy requests are computed in one pass."""
        pres: list[torch.Tensor | None] = [None] * len(requests)
        draws, noisy = [], []
        for i, (slot, shape, noise) in enumerate(requests):
            rows = shape[0]
            cols = shape[1] if slot.kind == "weight" else 1
            if noise <= 0 and torch.is_grad_enabled():
                continue  # emitted by _emit_grid, whose row blocks set the gradients' rounding
            if noise <= 0:
                a, b = self._grid_pre(slot, rows, cols, device)
                pres[i] = (a[:, None, :] + b[None, :, :]).reshape(rows * cols, -1)
            elif noise_mode == "query":
                draws.append(torch.rand((rows * cols, 6), generator=generator, device="cpu"))
                noisy.append(i)
            else:
                u_row = torch.rand((rows, 4), generator=generator, device="cpu")
                u_col = torch.rand((cols, 2), generator=generator, device="cpu")
                pres[i] = self._axis_pre(slot, rows, cols, noise, u_row, u_col, device)
        if noisy:
            u = (torch.cat(draws) if len(draws) > 1 else draws[0]).to(device) - 0.5
            raws, scale, dens = [], [], []
            for i in noisy:
                slot, shape, noise = requests[i]
                cols = shape[1] if slot.kind == "weight" else 1
                raw = self.raw_grid(slot, shape[0], cols, device)
                raws.append(raw)
                scale.append(raw.new_full((raw.shape[0], 1), float(noise)))
                if self.cfg.coords == "absolute":
                    den = [float(self.num_slots), float(slot.full[0]), float(slot.full[1])]
                    dens.append(raw.new_tensor(den).expand(raw.shape[0], 3))
            raw = torch.cat(raws) + torch.cat(scale) * u
            if self.cfg.coords == "absolute":
                x = torch.cat([raw[:, :3] / torch.cat(dens), raw[:, 3:] / self.norm], dim=1)
            else:
                x = torch.cat([raw[:, :3] / raw[:, 3:], raw[:, 3:] / self.norm], dim=1)
            feats = fourier_features(x, self.cfg.freqs).split([r.shape[0] for r in raws])
            for i, f in zip(noisy, feats):
                # its own (aligned) copy: a gemm's rounding can depend on the operand's
                # alignment, and this keeps the per-tensor path's values bit for bit
                pres[i] = self.head(requests[i][0].name).inp(f.clone())
        return pres

    def _axis_pre(
        self,
        slot: TensorSlot,
        rows: int,
        cols: int,
        noise: float,
        u_row: torch.Tensor,
        u_col: torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        """Input-layer pre-activation under per-row / per-column noise: the row coordinates
        (i, r, L, R) vary with the row only and the column ones (c, C) with the column only,
        so it is ``A[r] + B[c]`` (two small matmuls) instead of a per-query input layer."""
        head = self.head(slot.name)
        w = head.inp.weight
        u_row = u_row.to(device, w.dtype) - 0.5
        u_col = u_col.to(device, w.dtype) - 0.5
        r = torch.arange(rows, device=device, dtype=w.dtype)
        c = torch.arange(cols, device=device, dtype=w.dtype)
        i_, big_l = float(slot.index), float(self.num_slots)
        # raw row coordinates [i, r, L, R] and column coordinates [c, C], noisy
        row = torch.stack(
            [torch.full_like(r, i_), r, torch.full_like(r, big_l), torch.full_like(r, rows)], 1
        )
        col = torch.stack([c, torch.full_like(c, cols)], 1)
        row = row + noise * u_row
        col = col + noise * u_col
        if self.cfg.coords == "absolute":
            den_r, den_c = float(slot.full[0]), col.new_tensor(float(slot.full[1]))
            x_r = torch.stack([row[:, 0] / big_l, row[:, 1] / den_r], 1)
            x_c = (col[:, 0] / den_c)[:, None]
        else:
            x_r = torch.stack([row[:, 0] / row[:, 2], row[:, 1] / row[:, 3]], 1)
            x_c = (col[:, 0] / col[:, 1])[:, None]
        # dims of the NeuMeta vector [i/L, r/R, c/C, L/N, R/N, C/N]
        x_row = torch.cat([x_r, row[:, 2:4] / self.norm], 1)  # dims 0, 1, 3, 4
        x_col = torch.cat([x_c, col[:, 1:2] / self.norm], 1)  # dims 2, 5
        a = fourier_features(x_row, self.cfg.freqs) @ w[:, self._columns((0, 1, 3, 4), device)].T
        b = torch.addmm(
            head.inp.bias,
            fourier_features(x_col, self.cfg.freqs),
            w[:, self._columns((2, 5), device)].T,
        )
        return (a[:, None, :] + b[None, :, :]).reshape(rows * cols, -1)

    def _columns(self, dims: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Input-layer columns fed by ``fourier_features`` of the coordinate dims ``dims`` taken
        together (its layout: the values, then every dim's sines, then every dim's cosines)."""
        key = ("columns", dims, str(device))
        cols = self._grid_cache.get(key)
        if cols is None:
            f = self.cfg.freqs
            idx = list(dims)
            if f:
                idx += [6 + d * f + k for d in dims for k in range(f)]
                idx += [6 + 6 * f + d * f + k for d in dims for k in range(f)]
            cols = self._grid_cache[key] = torch.tensor(idx, device=device)
        return cols

    def _chunk(self, q: int, device: torch.device) -> int:
        """Queries per trunk block: without autograd on a CPU, blocks of :attr:`grid_chunk`
        (the activations stay in cache; each query's values are the same)."""
        if device.type != "cpu" or q <= self.grid_chunk or torch.is_grad_enabled():
            return q
        return self.grid_chunk

    def compile_trunk(self, cfg) -> None:
        """Run the trunks of :meth:`emit_tensors` compiled (a
        :class:`metamorph.hypernet.compiled.CompileConfig`; ``None`` or disabled: eager)."""
        from metamorph.hypernet.compiled import compile_fns

        self._compiled = compile_fns(cfg) if cfg is not None and cfg.enabled else None

    _compiled = None  # (trunk, stacked trunk) compiled by :meth:`compile_trunk`

    def _trunk(self, head: ResMLPHead, pre: torch.Tensor, chunk: int) -> torch.Tensor:
        """One head's trunk over query blocks of ``chunk``."""
        if self._compiled is not None:
            res = head.res
            return self._compiled[0](
                pre,
                [layer.weight for layer in res],
                [layer.bias for layer in res],
                head.scales,
                head.out.weight,
                head.out.bias,
            )
        q = pre.shape[0]
        if chunk >= q:
            return head.trunk(pre)
        return torch.cat([head.trunk(pre[i : i + chunk]) for i in range(0, q, chunk)])

    def _stacked_trunk(
        self, heads: list[ResMLPHead], pres: list[torch.Tensor], chunk: int
    ) -> list[torch.Tensor]:
        """:meth:`ResMLPHead.trunk` of several heads over equally many queries, as batched
        matmuls over their stacked weights (a gradient reaches each head's own parameters).
        Without autograd it runs in place, over query blocks of :attr:`grid_chunk` on a CPU."""
        h = torch.stack(pres)  # (G, Q, hidden)
        if self._compiled is not None:
            n = len(heads[0].res)
            y = self._compiled[1](
                h,
                [torch.stack([hd.res[k].weight for hd in heads]).transpose(1, 2) for k in range(n)],
                [torch.stack([hd.res[k].bias for hd in heads])[:, None, :] for k in range(n)],
                [torch.stack([hd.scales[k] for hd in heads])[:, None, None] for k in range(n)],
                torch.stack([hd.out.weight for hd in heads]).transpose(1, 2),
                torch.stack([hd.out.bias for hd in heads])[:, None, :],
            )
            return list(y.unbind(0))
        res = [
            (
                torch.stack([hd.res[k].weight for hd in heads]).transpose(1, 2),
                torch.stack([hd.res[k].bias for hd in heads])[:, None, :],
                [hd.scales[k] for hd in heads],
            )
            for k in range(len(heads[0].res))
        ]

        def run(h: torch.Tensor) -> torch.Tensor:
            fused = not torch.is_grad_enabled()
            h = h.relu_() if fused else torch.relu(h)
            for w, b, scales in res:
                r = torch.baddbmm(b, h, w)
                if fused:
                    r.relu_()
                    for g, s in enumerate(scales):
                        h[g].add_(r[g].mul_(s))
                else:
                    # each head's scale times its own block: the scale's gradient is then one
                    # whole-block sum, rounded as the per-head path rounds it at any thread count
                    r = torch.relu(r)
                    h = h + torch.stack([s * r[g] for g, s in enumerate(scales)])
            # the small output layer per head: as cheap, and its gradients round as the
            # per-head path's do (a batched one differs in the last bits of out.weight's)
            return torch.stack([hd.out(h[g]) for g, hd in enumerate(heads)])

        q = h.shape[1]
        if chunk >= q:
            y = run(h)
        else:
            y = torch.cat([run(h[:, i : i + chunk]) for i in range(0, q, chunk)], 1)
        return list(y.unbind(0))
