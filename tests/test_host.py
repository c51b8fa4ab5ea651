"""The host probe (``targets.host``) and the int8 forms it picks, on every kind of x86 host.

onnxruntime picks its integer kernels from CPUID and cannot be forced to another ISA, so
the saturating arithmetic of AVX2 (and AVX-512 without VNNI) is checked here in numpy on
every host, and against onnxruntime itself on the hosts that have it.
"""

import json

import numpy as np


def _onnxruntime_product(a, b):
    from modelkiln.targets.host import _int8_product

    return _int8_product(b).run(None, {"a": a})[0]


def test_the_saturation_reference_is_what_onnxruntime_computes_here():
    """On a host whose U8S8 kernel sums pairs in 16 bits the probe says so and onnxruntime
    gives exactly the numpy reference; on VNNI and AMX hosts it gives the exact sum."""
    from modelkiln.targets.host import host_probe, saturating_u8s8

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 201)).astype(np.uint8)  # an odd width: the last pair is padded
    b = rng.integers(-127, 128, (201, 16)).astype(np.int8)
    exact = a.astype(np.int64) @ b.astype(np.int64)
    saturated = saturating_u8s8(a, b)
    assert not np.array_equal(saturated, exact)  # full int8 weights do saturate in 16 bits
    got = _onnxruntime_product(a, b)
    expected = saturated if host_probe()["int8"]["u8s8_saturates"] else exact
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_the_form_picked_for_a_saturating_host_never_saturates():
    """What the probe picks on AVX2 without VNNI, checked on any host: 7-bit weights keep
    every pair sum within int16, even at the worst case, and per_row writes them."""
    from modelkiln.targets import host
    from modelkiln.targets.host import saturating_u8s8

    assert host.int8_form({"u8s8_saturates": True})[0] == host.SEVEN_BIT_WEIGHTS
    assert host.int8_form({"u8s8_saturates": False})[0] == host.FULL_INT8
    limit = host.WEIGHT_LIMITS[host.SEVEN_BIT_WEIGHTS]
    rng = np.random.default_rng(1)
    worst = np.full((4, 64), 255, np.uint8)
    for b in (np.full((64, 8), limit, np.int8), np.full((64, 8), -limit, np.int8),
              rng.integers(-limit, limit + 1, (64, 8)).astype(np.int8)):
        for a in (worst, rng.integers(0, 256, (4, 64)).astype(np.uint8)):
            np.testing.assert_array_equal(saturating_u8s8(a, b), a.astype(np.int64) @ b.astype(np.int64))
    full = np.full((64, 8), host.WEIGHT_LIMITS[host.FULL_INT8], np.int8)
    assert not np.array_equal(saturating_u8s8(worst, full), worst.astype(np.int64) @ full.astype(np.int64))


def test_per_row_writes_the_weights_of_the_form_it_is_given(tmp_path):
    import onnx
    import torch
    from onnx import numpy_helper

    from modelkiln.steps.per_row import quantize_per_row
    from modelkiln.targets.host import FULL_INT8, SEVEN_BIT_WEIGHTS, WEIGHT_LIMITS

    torch.manual_seed(0)
    source = tmp_path / "model.onnx"
    torch.onnx.export(torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval(),
                      (torch.randn(2, 32),), str(source), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    for form in (FULL_INT8, SEVEN_BIT_WEIGHTS):
        out = tmp_path / f"{form}.onnx"
        assert quantize_per_row(source, out, form=form) == 2
        codes = [numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert len(codes) == 2
        assert max(int(np.abs(c.astype(np.int16)).max()) for c in codes) == WEIGHT_LIMITS[form]


def test_the_probe_is_kept_per_host_cpu_and_onnxruntime_version(tmp_path, monkeypatch):
    from modelkiln.targets import host

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    runs = []
    probe, identity = host.run_probe, host._identity
    monkeypatch.setattr(host, "run_probe", lambda: runs.append(1) or probe())
    host.host_probe.cache_clear()
    try:
        assert host.cached_probe() is None
        found = host.host_probe()
        assert found["int8"]["form"] in host.WEIGHT_LIMITS and found["int8"]["reason"]
        assert found["int8"]["u8s7_saturates"] is False  # the form for saturating hosts is exact everywhere
        assert found["cpu_flags"] == host.cpu_model_and_flags()[1]
        (kept,) = tmp_path.glob("probe-*.json")
        assert json.loads(kept.read_text()) == found
        host.host_probe.cache_clear()  # as a new process does: read from the file
        assert host.host_probe() == found and len(runs) == 1
        # Another onnxruntime (or CPU) is another kind of host: probed again.
        monkeypatch.setattr(host, "_identity", lambda cpu, flags: {**identity(cpu, flags), "onnxruntime": "0.0"})
        monkeypatch.setattr(host, "run_probe", lambda: runs.append(1) or {**found, "onnxruntime": "0.0"})
        host.host_probe.cache_clear()
        assert host.cached_probe() is None
        host.host_probe()
        assert len(runs) == 2 and len(list(tmp_path.glob("probe-*.json"))) == 2
    finally:
        host.host_probe.cache_clear()


def test_half_precision_is_not_built_where_the_probe_found_it_slow(tmp_path, monkeypatch):
    """A probe as an AVX2 host's (bf16 emulated: slow where arithmetic bounds a product,
    as fast as float32 where reading the weights does): a model whose requests bring a
    sentence of tokens is not built in bf16, with the probe's reason; one whose requests
    are one feature row is, and so is any model for a GPU target."""
    import pytest
    import torch

    from modelkiln.errors import StepNotApplicable
    from modelkiln.plugins.api import TORCH, InputSpec, ModelHandle, StepContext
    from modelkiln.steps import quantize

    figures = {"compute_speedup": 0.2, "memory_speedup": 1.1}
    slow = {"cpu": "AMD EPYC", "cpu_flags": ["avx2"], "half": {"bfloat16": figures, "float16": figures}}
    monkeypatch.setattr(quantize, "host_probe", lambda: slow)
    tokens = ModelHandle(TORCH, torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 8)),
                         [InputSpec("input_ids", (-1, 64), "int64")])
    features = ModelHandle(TORCH, torch.nn.Sequential(torch.nn.Linear(16, 8)), [InputSpec("x", (-1, 16), "float32")])
    on_cpu = StepContext(tmp_path, "cpu", "torch", "cpu", 1, {})
    with pytest.raises(StepNotApplicable, match=r"quantize\.bf16: the host probe found bfloat16 products 5\.0x "
                                                r"slower than float32 on this host \(AMD EPYC: avx2\) where arithmetic"):
        quantize.BFloat16().apply(tokens, {}, on_cpu)
    assert quantize.BFloat16().apply(features, {}, on_cpu).obj.compute_dtype == torch.bfloat16
    on_gpu = StepContext(tmp_path, "gpu", "torch", "cuda", 1, {})
    assert quantize.Float16().apply(tokens, {}, on_gpu).obj.compute_dtype == torch.float16
