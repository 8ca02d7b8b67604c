"""Device profiles, end-to-end measurement, the latency predictor's table and the one budget:
profiles validate and name the valid ones, profiles that cannot run here fail clearly, tables
round-trip through their cache and are rebuilt for another machine, a prediction is exactly the
sum of its entries, and a budget never returns a model that measures over it (fake timers)."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config
from torch import nn

import metamorph
from metamorph.devices import (
    Budget,
    BudgetError,
    DeviceProfile,
    DeviceUnavailable,
    LatencyPredictor,
    MachineMismatch,
    Measurement,
    MemoryEstimate,
    Option,
    ProfileError,
    Timing,
    check_available,
    compare,
    estimate_memory,
    get_profile,
    list_profiles,
    measure_model,
    select_within_budget,
)
from metamorph.devices import profiles as profiles_mod
from metamorph.devices.predictor import CALL_KEY, pieces_of
from metamorph.models.resnet_cifar import CifarResNet, cifar_resnet_arch
from metamorph.utils.profile import count_flops

torch.set_num_threads(1)

FAST = {"warmup": 1, "min_run_time": 0.01, "lut_min_run_time": 0.005}
MACHINE_A = {"cpu": "Test CPU A", "cores": 2, "usable_cores": 2, "system": "Linux x86_64",
             "python": "3.11", "torch": "2.13.0", "onnxruntime": None, "onnx": None,
             "openvino": None, "cuda_device": None}  # fmt: skip


def tiny_arch(hidden=None, bn=False):
    a = cifar_resnet_arch(depth=8, stage_widths=[4, 8, 8], bn=bn)
    if hidden is not None:
        a.hidden = hidden
    return a


def fast(name: str) -> DeviceProfile:
    p = get_profile(name)
    for k, v in FAST.items():
        setattr(p, k, v)
    return p


class FakeTimer:
    """Deterministic: a piece's 'latency' is its parameter count / 1000 + 0.01 ms per input."""

    def __init__(self):
        self.calls = 0

    def __call__(self, module, xs, profile, min_run_time):
        self.calls += 1
        ms = sum(p.numel() for p in module.parameters()) / 1000 + 0.01 * len(xs)
        return Timing(ms, ms, ms, 5, 1)


def fake_measurement(ms: float, mb: float = 1.0) -> Measurement:
    mem = MemoryEstimate(int(mb * 2**20), 0, 0, 0, 0)
    return Measurement({"name": "fake"}, Timing(ms, ms, ms, 5, 1), 0, 0, mem, None, "", {}, "")


# ----------------------------------------------------------------------------------------------
# Profiles
# ----------------------------------------------------------------------------------------------


def test_shipped_profiles_load_and_validate():
    names = list_profiles()
    assert {"cpu1_b1", "cpu2_b32", "ort_cpu1_b1", "openvino_cpu1_b1", "cuda_b64"} <= set(names)
    for n in names:
        p = get_profile(n)
        assert p.name == n and p.batch_size >= 1
    assert get_profile("cpu2_b32").threads == 2 and get_profile("cpu2_b32").batch_size == 32
    assert get_profile("ort_cpu1_b1").runtime == "onnxruntime"


def test_bad_profile_names_and_typos_list_the_valid_ones(tmp_path):
    with pytest.raises(
        ProfileError, match=r"did you mean 'cpu1_b1'.*valid profiles: .*ort_cpu1_b1"
    ):
        get_profile("cpu1_b")
    with pytest.raises(ProfileError, match="valid profiles"):
        get_profile("tpu")
    bad = tmp_path / "mine.yaml"
    bad.write_text("runtime: torch_cpu\nthread: 2\n")
    with pytest.raises(
        ProfileError,
        match=r"unknown key\(s\) \['thread'\] \(thread: did you mean 'threads'\?\); valid keys: name, runtime, threads",
    ):
        get_profile(str(bad))
    bad.write_text("runtime: tensorrt\n")
    with pytest.raises(ProfileError, match="unknown runtime 'tensorrt'; choose one of torch_cpu"):
        get_profile(str(bad))
    with pytest.raises(ProfileError, match="float16 is supported on runtime cuda only"):
        DeviceProfile(name="x", dtype="float16")
    with pytest.raises(ProfileError, match="threads=4 has no meaning on runtime cuda"):
        DeviceProfile(name="x", runtime="cuda", threads=4)
    ok = tmp_path / "edge.yaml"
    ok.write_text("runtime: torch_cpu\nthreads: 1\nbatch_size: 4\n")
    assert get_profile(str(ok)).name == "edge" and get_profile(str(ok)).batch_size == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_profile_that_cannot_run_here_fails_clearly():
    with pytest.raises(DeviceUnavailable, match="needs a GPU: no CUDA device is available"):
        check_available(get_profile("cuda_b64"))
    with pytest.raises(DeviceUnavailable, match="no CUDA device"):
        measure_model(CifarResNet(tiny_arch()), "cuda_b64")
    with pytest.raises(DeviceUnavailable, match="no CUDA device"):
        LatencyPredictor("cuda_b64")


def test_a_runtime_that_is_not_installed_names_its_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        profiles_mod.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "openvino" else real(name, *a),
    )
    with pytest.raises(
        DeviceUnavailable,
        match=r"openvino package is not installed: pip install 'metamorph\[openvino\]'",
    ):
        check_available(get_profile("openvino_cpu1_b1"))


# ----------------------------------------------------------------------------------------------
# Measurement and memory
# ----------------------------------------------------------------------------------------------


def test_analytic_memory_of_a_single_conv():
    est = estimate_memory(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), (2, 3, 8, 8))
    assert est.params_bytes == (4 * 3 * 9 + 4) * 4
    assert est.input_bytes == 2 * 3 * 64 * 4
    assert est.activation_peak_bytes == 2 * 3 * 64 * 4 + 2 * 4 * 64 * 4  # input + output alive
    assert est.peak_bytes == est.params_bytes + est.activation_peak_bytes


def test_analytic_memory_holds_the_shortcut_input_across_a_block():
    arch = tiny_arch()
    est = estimate_memory(CifarResNet(arch), (1, 3, 16, 16))
    # inside the first block: its input (4x16x16) is held for the shortcut while conv2 reads the
    # hidden activation and writes its output (both 4x16x16)
    assert est.activation_peak_bytes >= 3 * 4 * 16 * 16 * 4


def test_torch_cpu_measurement_records_latency_costs_memory_and_machine():
    model = CifarResNet(tiny_arch())
    m = measure_model(model, fast("cpu1_b1"))
    lat = m.latency
    assert 0 < lat.q1_ms <= lat.median_ms <= lat.q3_ms and lat.blocks >= 5
    assert m.flops == count_flops(model) and m.params == sum(p.numel() for p in model.parameters())
    assert m.measured_memory_bytes is None and "not reported" in m.measured_memory_what
    assert m.memory_mb == m.memory.peak_mb > 0
    assert m.machine["cores"] >= 1 and m.machine["torch"] and len(m.fingerprint) == 16
    d = m.to_dict()
    assert d["profile"] == "cpu1_b1" and d["latency_iqr_ms"] == pytest.approx(lat.iqr_ms, abs=1e-5)
    back = Measurement.from_dict(json.loads(json.dumps(d)))
    assert back.latency_ms == pytest.approx(m.latency_ms, abs=1e-5)
    assert torch.get_num_threads() == 1  # the profile's thread count was restored


def test_onnxruntime_measurement_runs_the_exported_graph():
    pytest.importorskip("onnxruntime")
    m = measure_model(CifarResNet(tiny_arch()), fast("ort_cpu1_b1"))
    assert m.latency_ms > 0 and m.profile["runtime"] == "onnxruntime"


def test_openvino_measurement_runs_the_exported_graph():
    pytest.importorskip("openvino")
    m = measure_model(CifarResNet(tiny_arch()), fast("openvino_cpu1_b1"))
    assert m.latency_ms > 0 and m.machine["openvino"]


def test_figures_from_different_machines_are_not_compared_silently():
    a, b = fake_measurement(2.0), fake_measurement(1.0)
    a.profile = b.profile = {"name": "cpu1_b1", "runtime": "torch_cpu"}
    a.machine, b.machine = dict(MACHINE_A), dict(MACHINE_A, cpu="Test CPU B")
    with pytest.raises(MachineMismatch, match="different machines.*Test CPU A.*Test CPU B"):
        compare(a, b)
    assert compare(a, b, allow_different_machines=True) == 2.0
    b.machine = dict(MACHINE_A)
    assert compare(a, b) == 2.0


# ----------------------------------------------------------------------------------------------
# Predictor
# ----------------------------------------------------------------------------------------------


def test_prediction_is_exactly_the_sum_of_its_entries(tmp_path):
    timer = FakeTimer()
    pred = LatencyPredictor(fast("cpu1_b1"), cache_dir=tmp_path, timer=timer, machine=MACHINE_A)
    arch = tiny_arch([[3, 1], [8, 5], [2]])
    detail = pred.predict_detail(arch)
    pieces = pieces_of(arch)
    assert len(detail.blocks) == 5 and len(pieces) == 6
    expected = sum(pred.entries[p.key] for p in pieces)
    assert detail.latency_ms == expected == pred.predict(arch)
    assert detail.overhead_ms == pred.entries[pieces[-1].key] > 0
    # a network sharing block configurations reuses their entries; only new ones are measured
    before = timer.calls
    pred.predict(tiny_arch([[3, 1], [8, 5], [2, 2]]))
    assert timer.calls == before + 1  # the one new block (8 -> 2 -> 8, stride 1)
    # method "chain": (8 -> 2 -> 8, stride 1) is measured with the table, as the block after
    # 8 -> 2 -> 8, stride 2 in that block's chain
    timer = FakeTimer()
    pred = LatencyPredictor(
        fast("cpu1_b1"), cache_dir=tmp_path, timer=timer, machine=MACHINE_A, method="chain"
    )
    detail = pred.predict_detail(arch)
    assert detail.latency_ms == sum(pred.entries[p.key] for p in pieces) == pred.predict(arch)
    before = timer.calls
    pred.predict(tiny_arch([[3, 1], [8, 5], [2, 2]]))
    assert timer.calls == before


def test_session_runtimes_store_blocks_net_of_the_call_cost(tmp_path):
    pred = LatencyPredictor(
        fast("ort_cpu1_b1"), cache_dir=tmp_path, timer=FakeTimer(), machine=MACHINE_A
    )
    arch = tiny_arch()
    total = pred.predict(arch)
    call = pred.entries[CALL_KEY]
    assert call == pytest.approx(0.01)  # the empty graph: no parameters, one input
    for p in pieces_of(arch):  # the fake's cost of one block (its chain's call cost removed)
        module, xs = p.build(pred.profile)
        raw = sum(q.numel() for q in module.parameters()) / 1000 + 0.01 * len(xs)
        assert pred.entries[p.key] == pytest.approx(raw if p.overhead else raw - call)
    assert total == sum(pred.entries[p.key] for p in pieces_of(arch))


def test_tables_round_trip_through_the_cache_and_rebuild_for_another_machine(tmp_path):
    prof, arch = fast("cpu1_b1"), tiny_arch([[4, 2], [6, 8], [3]])
    t1 = FakeTimer()
    p1 = LatencyPredictor(prof, cache_dir=tmp_path, timer=t1, machine=MACHINE_A)
    v1 = p1.predict(arch)
    assert t1.calls == len(p1.entries) == 6 and p1.path.is_file()
    # same machine: every entry from the cache, nothing measured
    t2 = FakeTimer()
    p2 = LatencyPredictor(prof, cache_dir=tmp_path, timer=t2, machine=MACHINE_A)
    assert p2.entries == p1.entries and p2.predict(arch) == v1 and t2.calls == 0
    # another machine (or library version): its own table, measured afresh
    t3 = FakeTimer()
    other = dict(MACHINE_A, cpu="Test CPU B")
    p3 = LatencyPredictor(prof, cache_dir=tmp_path, timer=t3, machine=other)
    assert p3.fingerprint != p1.fingerprint and p3.path != p1.path
    assert p3.entries == {} and p3.predict(arch) == v1 and t3.calls == 6
    # the profile's threads are part of the key too
    prof2 = fast("cpu1_b1")
    prof2.threads = 2
    assert LatencyPredictor(prof2, cache_dir=tmp_path, timer=t3, machine=MACHINE_A).entries == {}
    # rebuild=True measures everything again
    t5 = FakeTimer()
    p5 = LatencyPredictor(prof, cache_dir=tmp_path, timer=t5, machine=MACHINE_A, rebuild=True)
    assert p5.entries == {} and p5.predict(arch) == v1 and t5.calls == 6
    # a file whose stored fingerprint does not match (copied, edited) is rebuilt
    doc = json.loads(p1.path.read_text())
    doc["fingerprint"] = "0" * 16
    p1.path.write_text(json.dumps(doc))
    t4 = FakeTimer()
    p4 = LatencyPredictor(prof, cache_dir=tmp_path, timer=t4, machine=MACHINE_A)
    assert p4.rebuilt and p4.entries == {}
    p4.predict(arch)
    assert t4.calls == 6 and json.loads(p1.path.read_text())["fingerprint"] == p1.fingerprint


def test_block_entries_are_timed_inside_chains_and_the_method_is_part_of_the_key(tmp_path):
    from metamorph.devices.predictor import CHAIN
    from metamorph.models.resnet_cifar import BasicBlock

    seen = []

    def timer(module, xs, profile, min_run_time):
        seen.append(module)
        return FakeTimer()(module, xs, profile, min_run_time)

    prof, arch = fast("cpu1_b1"), tiny_arch([[4, 2], [6, 8], [3]])
    chained = LatencyPredictor(
        prof, cache_dir=tmp_path, timer=timer, machine=MACHINE_A, method="chain"
    )
    # 5 blocks, the stem + head, and the stride-1 follow-ups of the two stride-2 blocks' chains
    chained.predict(arch)
    assert len(seen) == len(chained.entries) == 8
    chains = [m for m in seen if isinstance(m, nn.Sequential)]
    assert len(chains) == 7 and all(len(c) == CHAIN for c in chains)  # every block entry
    for c in chains:  # blocks of their own weights, each fed the previous one's output
        assert all(isinstance(b, BasicBlock) for b in c)
        assert len({id(b.conv1.weight) for b in c}) == CHAIN
    assert {(c[0].conv1.stride[0], c[1].conv1.stride[0]) for c in chains} == {(1, 1), (2, 1)}
    # one block per entry: a FakeTimer chain costs its blocks + one call's 0.01 ms, so each
    # entry is its block plus a CHAIN-th of a call (a follow-up's entry is subtracted exactly)
    for p in pieces_of(arch)[:-1]:
        blk, _ = p.build(prof)
        one = sum(q.numel() for q in blk.parameters()) / 1000
        assert chained.entries[p.key] == pytest.approx(one + 0.01 / CHAIN)
    isolated = LatencyPredictor(
        prof, cache_dir=tmp_path, timer=FakeTimer(), machine=MACHINE_A, method="isolated"
    )
    assert isolated.fingerprint != chained.fingerprint and isolated.entries == {}
    isolated.predict(arch)
    assert json.loads(isolated.path.read_text())["method"] == "isolated"
    assert json.loads(chained.path.read_text())["method"] == "chain"
    with pytest.raises(ValueError, match="unknown predictor method 'chained'"):
        LatencyPredictor(prof, cache_dir=tmp_path, timer=FakeTimer(), method="chained")


def test_cache_dir_follows_metamorph_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAMORPH_CACHE", str(tmp_path / "c"))
    pred = LatencyPredictor(fast("cpu1_b1"), timer=FakeTimer(), machine=MACHINE_A)
    pred.predict(tiny_arch())
    assert pred.path.parent == tmp_path / "c" / "devices" and pred.path.is_file()


def test_real_table_predicts_a_positive_latency(tmp_path):
    pred = LatencyPredictor(fast("cpu1_b1"), cache_dir=tmp_path)
    assert pred.predict(tiny_arch()) > 0


# ----------------------------------------------------------------------------------------------
# Budget
# ----------------------------------------------------------------------------------------------


def _options(n=6):
    # option i: i+1 MFLOPs, accuracy grows with size; predicted latency i+1 ms
    return [Option(f"o{i}", i, params=100 * (i + 1), flops=(i + 1) * 10**6) for i in range(n)]


def _by_size(opts):
    for o in opts:
        o.score = float(o.item)


def test_budget_never_returns_a_model_that_measures_over_it():
    budget = Budget(max_latency_ms=3.5, device="cpu1_b1")
    measured = []

    def measure(o):  # the predictor underestimates the two largest fitting options
        measured.append(o.label)
        return fake_measurement((o.item + 1) * (2.0 if o.item >= 1 else 1.0))

    best = select_within_budget(
        _options(), budget, predict=lambda o: o.item + 1.0, measure=measure, score=_by_size
    )
    assert measured == ["o2", "o1", "o0"]  # most accurate first; over-budget ones skipped
    assert best.label == "o0" and best.measured.latency_ms <= 3.5
    assert best.predicted_ms == 1.0
    opts = _options()
    with pytest.raises(BudgetError, match=r"3 measured end to end, all over budget"):
        select_within_budget(
            opts,
            budget,
            predict=lambda o: o.item + 1.0,
            measure=lambda o: fake_measurement(10.0),
            score=_by_size,
        )
    assert all("measured_latency_ms" in o.fails for o in opts[:3])


def test_budget_limits_params_flops_and_memory_and_explains_an_impossible_one():
    budget = Budget(max_flops=4e6, max_memory_mb=2.5, device="cpu1_b1")
    best = select_within_budget(
        _options(),
        budget,
        memory=lambda o: 0.5 * (o.item + 1),
        measure=lambda o: fake_measurement(1.0, mb=0.5 * (o.item + 1)),
        score=_by_size,
    )
    assert best.label == "o3" and best.flops <= 4e6 and best.measured.memory_mb <= 2.5
    with pytest.raises(
        BudgetError, match=r"budget.max_params=50: the smallest achievable is 100 params \(o0\)"
    ):
        select_within_budget(_options(), Budget(max_params=50), score=_by_size)
    # without a device limit nothing is measured: the best by score within the analytic limits
    assert select_within_budget(_options(), Budget(max_params=300), score=_by_size).label == "o2"


def test_budget_validation_names_the_problem():
    with pytest.raises(ValueError, match="budget.max_latency_ms=-1.0 must be a positive number"):
        Budget(max_latency_ms=-1)
    with pytest.raises(ProfileError, match="did you mean 'ort_cpu1_b1'"):
        Budget(max_latency_ms=1, device="ort_cpu")
    with pytest.raises(
        ValueError, match="threads, batch size and timing now belong to the device profile"
    ):
        Budget.from_dict({"max_latency_ms": 1, "threads": 2})
    assert Budget(max_latency_ms=1).profile.name == "cpu1_b1"
    assert Budget(max_flops=1e6).to_dict() == {"max_flops": 1_000_000}


def test_genecai_flops_ratios_pick_the_most_accurate_point_under_each():
    from metamorph.search.pipeline import pick_final

    pts = [SimpleNamespace(flops=f, acc=a) for f, a in [(10, 50), (20, 70), (30, 69), (40, 80)]]
    result = SimpleNamespace(front=pts, base_flops=100)
    got = pick_final(result, 3, [0.25, 0.35, 0.001], 100)
    assert got == [pts[1]]  # 0.25 -> 20 (70%); 0.35 -> 20 again (not repeated); 0.001: none
    assert pick_final(result, 3, [0.5], 100) == [pts[3]]


# ----------------------------------------------------------------------------------------------
# metamorph-profile
# ----------------------------------------------------------------------------------------------


def _profile_yaml(tmp_path, runtime="torch_cpu"):
    p = tmp_path / f"fast_{runtime}.yaml"
    p.write_text(
        f"runtime: {runtime}\nthreads: 1\nbatch_size: 1\nwarmup: 1\nmin_run_time: 0.01\n"
        "lut_min_run_time: 0.005\n"
    )
    return str(p)


def test_cli_measures_a_model_file_and_compares_runs(tmp_path, capsys):
    from metamorph.cli import profile
    from metamorph.io.model_file import save_model

    save_model(CifarResNet(tiny_arch()), tmp_path / "tiny")
    dev = _profile_yaml(tmp_path)
    out = tmp_path / "m.json"
    argv = profile._argv(["metamorph-profile", f"model={tmp_path / 'tiny.json'}", f"device={dev}"])
    assert argv[1].startswith("src=")
    cfg = compose_config("profile", tmp_path, [*argv[1:], f"out={out}"])
    s = profile.run(cfg)
    assert s["latency_ms"] > 0 and s["params"] > 0 and s["flops"] > 0 and out.is_file()
    assert s["profile"] == "fast_torch_cpu" and s["memory_analytic"]["peak_mb"] > 0
    profile.report_measure(s)
    assert "latency" in capsys.readouterr().out
    cfg = compose_config("profile", tmp_path, [*argv[1:], f"compare={out}"])
    assert profile.run(cfg)["latency_ratio_vs_compare"] > 0
    # a different machine's figure refuses to compare
    doc = json.loads(out.read_text())
    doc["machine"]["cpu"] = "elsewhere"
    out.write_text(json.dumps(doc))
    with pytest.raises(MachineMismatch):
        profile.run(cfg)


def test_cli_errors_are_clear(tmp_path):
    from metamorph.cli import profile

    with pytest.raises(ValueError, match="model= \\(or src=\\) is required"):
        profile.run(compose_config("profile", tmp_path, []))
    with pytest.raises(FileNotFoundError, match="not found"):
        profile.run(compose_config("profile", tmp_path, [f"src={tmp_path / 'nope.json'}"]))
    assert profile._argv(["x", "lut", "device=cpu1_b1"]) == ["x", "device=cpu1_b1", "command=lut"]


def test_cli_lut_builds_validates_and_plots(tmp_path):
    from metamorph.cli import profile

    cfg = compose_config(
        "profile",
        tmp_path,
        [
            "command=lut",
            f"device={_profile_yaml(tmp_path)}",
            "arch=resnet20",
            "n=3",
            f"out_dir={tmp_path / 'o'}",
            f"cache_dir={tmp_path / 'cache'}",
        ],
    )
    s = profile.run(cfg)
    assert s["n"] == 3 and s["mape_pct"] >= 0 and -1 <= s["spearman"] <= 1
    assert (tmp_path / "o" / "lut_fast_torch_cpu_resnet20.png").stat().st_size > 1000
    rows = json.loads((tmp_path / "o" / "lut_fast_torch_cpu_resnet20.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["uniform", "per_block", "per_block_depth"]
    assert len(rows[2]["hidden"][0]) <= 3


def test_sample_device_names_a_profile_and_points_to_eval_device(tmp_path):
    from metamorph.cli import sample

    cfg = compose_config("sample", tmp_path, ["ckpt=x", f"out={tmp_path / 'o'}", "device=cuda"])
    with pytest.raises(ValueError, match="device= names a device profile.*eval_device=cuda"):
        sample._device_profile(cfg)
    cfg = compose_config("sample", tmp_path, ["ckpt=x", f"out={tmp_path / 'o'}", "device=ort_cpu1"])
    with pytest.raises(ProfileError, match="did you mean 'ort_cpu1_b1'"):
        sample._device_profile(cfg)


def test_the_public_api_exposes_profiles():
    assert metamorph.devices.get_profile("cpu1_b1").runtime == "torch_cpu"


def test_budget_from_config_keeps_defaults_for_nulls_and_names_unknown_keys():
    from omegaconf import OmegaConf

    from metamorph.devices import Budget

    node = OmegaConf.create({"max_latency_ms": "2.5", "latency_margin": None, "latency_repeats": 1})
    b = Budget.from_config(node, "cpu1_b1")
    assert b.max_latency_ms == 2.5 and b.latency_repeats == 1
    assert b.latency_margin == Budget().latency_margin and b.profile.name == "cpu1_b1"
    with pytest.raises(ValueError, match=r"unknown budget keys \['max_latncy_ms'\]"):
        Budget.from_config({"max_latncy_ms": 1.0})
