"""Device profiles, end-to-end measurement, a latency predictor and the one budget type.

The bottom layer every method answers "will this run in X ms and Y MB on my device?" with:
:mod:`~metamorph.devices.profiles` (named, typed profiles), :mod:`~metamorph.devices.measure`
(latency median / IQR per runtime, FLOPs, parameters, memory), :mod:`~metamorph.devices.memory`
(analytic parameters + activations), :mod:`~metamorph.devices.predictor` (per-block look-up
table), :mod:`~metamorph.devices.machine` (fingerprint) and :mod:`~metamorph.devices.budget`.
"""

from metamorph.devices.budget import Budget, BudgetError, Option, select_within_budget
from metamorph.devices.machine import MachineMismatch, fingerprint, machine_info
from metamorph.devices.measure import Measurement, Timing, compare, measure_model, time_module
from metamorph.devices.memory import MemoryEstimate, estimate_memory
from metamorph.devices.predictor import LatencyPredictor, Prediction, register_decomposer
from metamorph.devices.profiles import (
    DeviceProfile,
    DeviceUnavailable,
    ProfileError,
    check_available,
    get_profile,
    list_profiles,
)

__all__ = [
    "Budget",
    "BudgetError",
    "DeviceProfile",
    "DeviceUnavailable",
    "LatencyPredictor",
    "MachineMismatch",
    "Measurement",
    "MemoryEstimate",
    "Option",
    "Prediction",
    "ProfileError",
    "Timing",
    "check_available",
    "compare",
    "estimate_memory",
    "fingerprint",
    "get_profile",
    "list_profiles",
    "machine_info",
    "measure_model",
    "register_decomposer",
    "select_within_budget",
    "time_module",
]
