"""One budget type for every method, and the selection that honours it.

A :class:`Budget` limits parameters, FLOPs (one image, multiply-add = 2), latency and memory on a
named device profile. :func:`select_within_budget` filters candidates by their cheap analytic
costs, then by the profile's latency predictor (:class:`~metamorph.devices.predictor.LatencyPredictor`),
ranks the rest by the caller's score, and measures them end to end in rank order: the first whose
measured figures are within the budget is returned with both the predicted and the measured
figures; one that measures over budget is recorded as such and the next is tried. If none fits,
:class:`BudgetError` says what the smallest achievable figures were: an over-budget model is
never returned.

A latency budget keeps a safety margin, because a latency figure repeats only within its
run-to-run spread and a user who re-measures the chosen model must find it within the budget:
predictions and the final measurement must be at most ``max_latency_ms * (1 - latency_margin)``
(default 5%), and the final measurement is the slowest of ``latency_repeats`` (default 3) fresh
processes (:func:`metamorph.devices.fresh.measure_deployed`). Measured on the 2-core machine
(docs/results/devices.md): two ``metamorph-profile`` runs of one file, idle, 3.3% apart; four
processes at load ~1, 16.4% apart (0.518-0.603 ms), the slowest 0.5% above the slowest of the
other three. ``latency_margin=0 latency_repeats=1`` turns both off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from metamorph.devices.measure import Measurement
from metamorph.devices.profiles import DeviceProfile, get_profile

DEFAULT_DEVICE = "cpu1_b1"
LIMITS = ("max_params", "max_flops", "max_latency_ms", "max_memory_mb")
DEFAULT_LATENCY_MARGIN = 0.05  # above a 4th process's excess over the slowest of 3 (0.5%)
DEFAULT_LATENCY_REPEATS = 3  # one process's figure alone spread 16% (docs/results/devices.md)


class BudgetError(ValueError):
    """No candidate meets the budget (the message gives the smallest achievable figures)."""


@dataclass
class Budget:
    max_params: int | None = None
    max_flops: int | None = None  # forward FLOPs of one image at the profile's resolution
    max_latency_ms: float | None = None  # median latency on ``device``
    max_memory_mb: float | None = None  # params + activations (analytic; measured where reported)
    device: str | None = None  # device profile; None: cpu1_b1 when latency or memory is limited
    # a latency is accepted at most max_latency_ms * (1 - latency_margin): the run-to-run spread
    latency_margin: float = DEFAULT_LATENCY_MARGIN
    # the final check measures in this many fresh processes and accepts on the slowest
    latency_repeats: int = DEFAULT_LATENCY_REPEATS

    def __post_init__(self) -> None:
        if not isinstance(self.latency_repeats, int) or self.latency_repeats < 1:
            raise ValueError(
                f"budget.latency_repeats={self.latency_repeats!r} must be a whole number >= 1 "
                "(fresh processes the chosen model is measured in; the slowest figure counts)"
            )
        try:
            self.latency_margin = float(self.latency_margin)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"budget.latency_margin={self.latency_margin!r} is not a number"
            ) from e
        if not 0.0 <= self.latency_margin < 0.5:
            raise ValueError(
                f"budget.latency_margin={self.latency_margin} must be in [0, 0.5): the fraction of "
                "max_latency_ms kept free for run-to-run spread (0.05: accept at most 95%)"
            )
        for name in LIMITS:
            v = getattr(self, name)
            if v is None:
                continue
            try:
                v = float(v)
            except (TypeError, ValueError) as e:
                raise ValueError(f"budget.{name}={v!r} is not a number") from e
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"budget.{name}={v} must be a positive number")
            setattr(self, name, int(v) if name in ("max_params", "max_flops") else v)
        if self.device is not None:
            self.device = (
                get_profile(self.device).name
                if not str(self.device).endswith((".yaml", ".yml"))
                else str(self.device)
            )
            get_profile(self.device)  # a typo fails here, with the valid names

    @classmethod
    def from_dict(cls, d: dict, where: str = "budget") -> Budget:
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            hint = ""
            if {"threads", "batch_size", "latency_min_run_time"} & set(unknown):
                hint = (
                    " (threads, batch size and timing now belong to the device profile: "
                    "choose one with device=<profile>, see metamorph.devices.list_profiles())"
                )
            raise ValueError(f"unknown {where} keys {unknown}; valid: {', '.join(known)}{hint}")
        return cls(**d)

    @classmethod
    def from_config(cls, node: Any, device: str | None = None, where: str = "budget") -> Budget:
        """The budget of an entry point's ``budget:`` config node (a DictConfig or dict) on
        ``device``: unknown keys are refused by name, a null margin / repeats keeps the default."""
        if node is None:
            d: dict = {}
        elif isinstance(node, dict):
            d = dict(node)
        else:
            from omegaconf import OmegaConf

            d = OmegaConf.to_container(node, resolve=True)
        for k in ("latency_margin", "latency_repeats"):
            if d.get(k) is None:
                d.pop(k, None)
        return cls.from_dict({**d, "device": device}, where)

    @property
    def active(self) -> bool:
        return any(getattr(self, n) is not None for n in LIMITS)

    @property
    def needs_device(self) -> bool:
        """Latency or memory is limited, or a device was named: candidates get measured."""
        return (
            self.max_latency_ms is not None
            or self.max_memory_mb is not None
            or self.device is not None
        )

    @property
    def accepted_latency_ms(self) -> float | None:
        """The latency a prediction and the final measurement must not exceed:
        ``max_latency_ms * (1 - latency_margin)``."""
        if self.max_latency_ms is None:
            return None
        return self.max_latency_ms * (1.0 - self.latency_margin)

    @property
    def profile(self) -> DeviceProfile:
        return get_profile(self.device or DEFAULT_DEVICE)

    def measure(self, model) -> Measurement:
        """The end-to-end figure a candidate is accepted on: ``model`` written as a model file and
        measured on the budget's profile in ``latency_repeats`` fresh processes, the slowest
        kept (:func:`metamorph.devices.fresh.measure_deployed`): what ``metamorph-profile`` says
        of the written file. Every customizer's default ``measure``."""
        from metamorph.devices.fresh import measure_deployed

        return measure_deployed(model, self.profile, repeats=self.latency_repeats)

    def describe(self) -> str:
        parts = []
        if self.max_params is not None:
            parts.append(f"params <= {self.max_params:,}")
        if self.max_flops is not None:
            parts.append(f"FLOPs <= {self.max_flops:,}")
        if self.max_latency_ms is not None:
            lat = f"latency <= {self.max_latency_ms:g} ms"
            if self.latency_margin:
                lat += (
                    f" (accepted <= {self.accepted_latency_ms:.4g} ms: "
                    f"{100 * self.latency_margin:g}% margin)"
                )
            parts.append(lat)
        if self.max_memory_mb is not None:
            parts.append(f"memory <= {self.max_memory_mb:g} MB")
        if self.needs_device:
            p = self.profile
            parts.append(f"on {p.name} ({p.description or p.runtime})")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        d = {n: getattr(self, n) for n in LIMITS if getattr(self, n) is not None}
        if self.max_latency_ms is not None:
            d["latency_margin"] = self.latency_margin
            d["latency_repeats"] = self.latency_repeats
            d["accepted_latency_ms"] = round(self.accepted_latency_ms, 6)
        if self.needs_device:
            d["device"] = self.profile.name
        return d


@dataclass
class Option:
    """One candidate: its analytic costs, predicted and measured figures, and score."""

    label: str
    item: Any  # what the caller builds / measures (a shape, an arch, a model)
    params: int = 0
    flops: int = 0
    memory_mb: float | None = None  # analytic at the profile's batch size
    predicted_ms: float | None = None
    measured: Measurement | None = None
    score: float | None = None
    fails: list[str] = field(default_factory=list)

    @property
    def within_budget(self) -> bool:
        return not self.fails

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "params": self.params,
            "flops": self.flops,
            "memory_mb": None if self.memory_mb is None else round(self.memory_mb, 4),
            "predicted_latency_ms": None
            if self.predicted_ms is None
            else round(self.predicted_ms, 4),
            "measured_latency_ms": None
            if self.measured is None
            else round(self.measured.latency_ms, 4),
            "score": self.score,
            "within_budget": self.within_budget,
            "fails": list(self.fails),
        }


def select_within_budget(
    options: Sequence[Option],
    budget: Budget,
    *,
    predict: Callable[[Option], float] | None = None,
    memory: Callable[[Option], float] | None = None,
    measure: Callable[[Option], Measurement] | None = None,
    score: Callable[[list[Option]], None] | None = None,
    log: Callable[[str], None] | None = None,
    what: str = "candidate",
    describe: Callable[[Option], str] | None = None,
) -> Option:
    """The best option within ``budget``, measured end to end.

    ``options`` carry their ``params`` and ``flops``. ``memory(o)`` gives the analytic memory in MB
    (needed with ``max_memory_mb``), ``predict(o)`` the predicted latency (needed with
    ``max_latency_ms``), ``measure(o)`` a :class:`Measurement` on the budget's profile (needed when
    the budget names a device), ``score(options)`` sets ``o.score`` (higher is better) on the
    options within the analytic and predicted limits; without it, fewer FLOPs rank first.
    Raises :class:`BudgetError` if no option measures within the budget (``what`` names the
    options in its message, ``describe(o)`` adds detail after an option's label).
    """
    if not budget.active:
        raise ValueError(
            "the budget sets no limit: give budget.max_params, max_flops, max_latency_ms or "
            "max_memory_mb"
        )
    log = log or (lambda s: None)
    options = list(options)
    for o in options:
        o.fails = []
        o.measured = None
        if budget.max_params is not None and o.params > budget.max_params:
            o.fails.append("params")
        if budget.max_flops is not None and o.flops > budget.max_flops:
            o.fails.append("flops")
    if budget.max_memory_mb is not None:
        if memory is None:
            raise ValueError("a memory budget needs memory= (the analytic estimate)")
        for o in [o for o in options if not o.fails]:
            o.memory_mb = float(memory(o))
            if o.memory_mb > budget.max_memory_mb:
                o.fails.append("memory_mb")
    if budget.max_latency_ms is not None:
        if predict is None:
            raise ValueError("a latency budget needs predict= (the profile's latency predictor)")
        ok = [o for o in options if not o.fails]
        log(f"  predicting latency of {len(ok)} options on {budget.profile.name}")
        for o in ok:
            o.predicted_ms = float(predict(o))
            if o.predicted_ms > budget.accepted_latency_ms:
                o.fails.append("predicted_latency_ms")
    within = [o for o in options if not o.fails]
    if not within:
        raise BudgetError(_none_fits(options, budget, what, describe))
    if score is not None:
        score(within)
    ranked = sorted(
        within,
        key=lambda o: (-(o.score if o.score is not None else -math.inf), o.flops, o.params),
    )
    if not budget.needs_device:
        return ranked[0]
    if measure is None:
        raise ValueError("a latency or memory budget on a device needs measure=")
    for o in ranked:
        o.measured = measure(o)
        over = []
        if budget.max_latency_ms is not None and o.measured.latency_ms > budget.accepted_latency_ms:
            over.append("measured_latency_ms")
        if budget.max_memory_mb is not None and o.measured.memory_mb > budget.max_memory_mb:
            over.append("measured_memory_mb")
        if not over:
            return o
        o.fails.extend(over)
        log(
            f"  {o.label}: measured {o.measured.latency_ms:.3f} ms / {o.measured.memory_mb:.2f} MB"
            f" is over the budget; trying the next"
        )
    raise BudgetError(_none_fits(options, budget, what, describe))


def _none_fits(options: list[Option], budget: Budget, what: str, describe) -> str:
    parts = []
    describe = describe or (lambda o: "")

    def lowest(metric: str, get, fmt, limit_name: str) -> None:
        have = [(get(o), o) for o in options if get(o) is not None]
        if not have:
            parts.append(f"{metric}: not reached (every option failed an earlier limit)")
            return
        v, o = min(have, key=lambda t: t[0])
        parts.append(
            f"budget.{limit_name}={getattr(budget, limit_name):,}: the smallest achievable is "
            f"{fmt(v)} ({o.label}{describe(o)})"
        )

    if budget.max_params is not None:
        lowest("params", lambda o: o.params, lambda v: f"{v:,} params", "max_params")
    if budget.max_flops is not None:
        lowest("flops", lambda o: o.flops, lambda v: f"{v:,} FLOPs", "max_flops")
    if budget.max_memory_mb is not None:
        lowest("memory", lambda o: o.memory_mb, lambda v: f"{v:.3f} MB", "max_memory_mb")
    if budget.max_latency_ms is not None:
        lowest(
            "latency",
            lambda o: o.predicted_ms,
            lambda v: f"{v:.3f} ms predicted",
            "max_latency_ms",
        )
        measured = [o for o in options if o.measured is not None]
        if measured:
            m = min(measured, key=lambda o: o.measured.latency_ms)
            parts.append(
                f"{len(measured)} measured end to end, all over budget (lowest "
                f"{m.measured.latency_ms:.3f} ms, {m.label})"
            )
    return (
        f"no {what} meets the budget ({budget.describe()}) among {len(options)} candidates; "
        + "; ".join(parts)
    )
