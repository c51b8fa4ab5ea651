"""What this host's CPU runs fast, found once per host and kept in a file.

Model hosts are not one CPU: AVX2-only machines, AVX-512 with VNNI, AMX. The int8 form a
quantizer writes must suit the host's kernels, and the figures a variant was measured
with only mean something beside the host they came from (``variant.json``'s
``measured_on``). The probe asks the kernels themselves, not a table of flags:

- **U8S8 saturation.** onnxruntime multiplies uint8 activations by int8 weights with
  ``VPMADDUBSW`` on AVX2 and on AVX-512 without VNNI: two products are summed into a
  saturating 16-bit integer, so ``255 * 127 + 255 * 127`` comes back as 32767 (its
  documentation says so under ``reduce_range``). VNNI (``VPDPBUSD``) and AMX sum in 32
  bits. The probe multiplies the worst case once through onnxruntime and compares it
  with the exact sum; on a host that saturates the quantizers write 7-bit weights
  (``u8s7``: ``255 * 63 * 2 < 32767``), elsewhere full int8 (``u8s8``).
  :func:`saturating_u8s8` is the same arithmetic in numpy, so a host that does not
  saturate can still check what a saturating one would compute.
- **A micro-benchmark** of one BERT-base-sized product in fp32, U8S8 and S8S8 (one
  thread): whether int8 pays here at all, and why S8S8, which has no fast x86 kernel
  without AVX-VNNI-INT8, is not the answer to saturation.
- **torch's 16-bit products** against float32, one bound by arithmetic and one by
  reading the weights: without bf16 arithmetic (AVX-512 BF16, AMX) a CPU emulates it,
  far slower where arithmetic bounds the time, while half the bytes can still win
  where reading does. ``quantize.bf16``/``fp16`` are not built where they would lose.

onnxruntime picks its kernels from CPUID when it loads and cannot be told otherwise (no
switch in MLAS's platform set-up), which is why the saturation check is arithmetic and
not a forced kernel. The result is kept in ``$KILN_CACHE_DIR`` (default
``~/.cache/modelkiln``), one file per host, CPU and onnxruntime version; ``kiln
targets`` shows it and the daemon probes at start, before its workers need it. The probe
itself takes a second or two; importing onnxruntime and torch, where nothing has, more.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import socket
import time
from pathlib import Path

import numpy as np

# Raised when what the probe finds (or how) changes: older files are probed again.
PROBE_VERSION = 2

# The CPU features that decide which kernels run (and so which variant is fastest).
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16")

# The int8 forms the quantizers write: activations uint8 (zero point 128) against weights
# of this many magnitude levels. The names say the kernel's operand types.
FULL_INT8 = "u8s8"
SEVEN_BIT_WEIGHTS = "u8s7"
WEIGHT_LIMITS = {FULL_INT8: 127, SEVEN_BIT_WEIGHTS: 63}

# The micro-benchmark's product: a BERT-base attention projection at 128 tokens.
_ROWS, _WIDTH = 128, 768


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and which of :data:`CPU_FLAGS` it has (``/proc/cpuinfo``)."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = [f for f in CPU_FLAGS if f in value.split()]
                    break
    except OSError:
        pass
    return cpu, flags


def saturating_u8s8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` (uint8 ``[M, K]`` by int8 ``[K, N]``) as ``VPMADDUBSW`` computes it: the
    products of neighbouring ``k`` (0 and 1, 2 and 3, ...) summed and saturated to int16,
    then summed exactly in int32."""
    a, b = a.astype(np.int32), b.astype(np.int32)
    if a.shape[1] % 2:
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * b[None, 0::2, :] + a[:, 1::2, None] * b[None, 1::2, :]
    return np.clip(pairs, -32768, 32767).sum(axis=1, dtype=np.int64).astype(np.int32)


def _session(nodes, initializers, inputs):
    import onnx
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "probe", inputs, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    # Opset 17's own IR version, not the installed onnx package's newest: an onnxruntime
    # older than that package refuses a model of a later IR version.
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _int8_product(weights: np.ndarray):
    """A session computing ``float(a @ weights)`` for uint8 ``a`` (input ``a``), as the
    per-row quantizer writes it (MatMulIntegerToFloat, the weights a constant)."""
    import onnx
    from onnx import helper, numpy_helper

    return _session(
        [helper.make_node("MatMulIntegerToFloat", ["a", "w", "one", "one", "zero"], ["y"], domain="com.microsoft")],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array(1.0, np.float32), "one"),
         numpy_helper.from_array(np.array(0, np.uint8), "zero")],
        [helper.make_tensor_value_info("a", onnx.TensorProto.UINT8, [None, weights.shape[0]])])


def u8s8_saturates(limit: int = 127) -> bool:
    """Whether onnxruntime's U8S8 product on this host saturates with weights of
    magnitude ``limit``: the worst case (255 against ``limit`` throughout) against its
    exact sum, for one row (MLAS's matrix-vector kernel) and for 16 (its matrix kernel)."""
    width = 64
    session = _int8_product(np.full((width, 16), limit, np.int8))
    return any(bool(np.any(session.run(None, {"a": np.full((rows, width), 255, np.uint8)})[0] != 255 * limit * width))
               for rows in (1, 16))


def _timed(session, feed, rounds: int) -> float:
    session.run(None, feed)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def time_int8_forms(rounds: int = 15) -> dict:
    """Median ms of one ``[128, 768] x [768, 768]`` product in fp32, U8S8 and S8S8 on one
    thread, the forms taking turns."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    x = rng.standard_normal((_ROWS, _WIDTH)).astype(np.float32)
    w = rng.standard_normal((_WIDTH, _WIDTH)).astype(np.float32)
    codes = rng.integers(-63, 64, (_WIDTH, _WIDTH)).astype(np.int8)
    activations = rng.integers(0, 256, (_ROWS, _WIDTH)).astype(np.uint8)
    fp32 = _session([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")],
                    [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, _WIDTH])])
    s8s8 = _session([helper.make_node("MatMulInteger", ["a", "w"], ["i"]),
                     helper.make_node("Cast", ["i"], ["y"], to=onnx.TensorProto.FLOAT)],
                    [numpy_helper.from_array(codes, "w")],
                    [helper.make_tensor_value_info("a", onnx.TensorProto.INT8, [None, _WIDTH])])
    forms = {"fp32": (fp32, {"x": x}), "u8s8": (_int8_product(codes), {"a": activations}),
             "s8s8": (s8s8, {"a": (activations.astype(np.int16) - 128).astype(np.int8)})}
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(3):  # in turns, so a busy moment of the host falls on every form
        for name, (session, feed) in forms.items():
            times[name].append(_timed(session, feed, max(1, rounds // 3)))
    return {name: round(float(np.median(t)), 3) for name, t in times.items()}


# The 16-bit probe's products: one bound by arithmetic (a 128-token BERT-base projection)
# and one by reading the weights (one row against a 4096 x 4096 matrix, as a decoding
# step is): a CPU without 16-bit arithmetic can lose the first and still win the second.
_HALF_SHAPES = {"compute": (128, 768, 768), "memory": (1, 4096, 4096)}
HALF_TYPES = ("bfloat16", "float16")


def time_half_precision(rounds: int = 1) -> dict | None:
    """torch's speed-up of each 16-bit type over float32 on :data:`_HALF_SHAPES` (one
    thread; below 1 is slower), or None without torch."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        found: dict[str, dict] = {}
        for bound, (rows, width, outputs) in _HALF_SHAPES.items():
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(rows, width, generator=generator)
            w = torch.randn(outputs, width, generator=generator)
            calls = {name: (x.to(getattr(torch, name)), w.to(getattr(torch, name))) for name in ("float32", *HALF_TYPES)}
            times: dict[str, list[float]] = {name: [] for name in calls}
            with torch.inference_mode():
                for _ in range(3):  # in turns, as the int8 forms are
                    for name, (a, b) in calls.items():
                        torch.nn.functional.linear(a, b)
                        start = time.perf_counter()
                        for _ in range(rounds):
                            torch.nn.functional.linear(a, b)
                        times[name].append((time.perf_counter() - start) / rounds)
            fp32 = float(np.median(times["float32"]))
            for name in HALF_TYPES:
                found.setdefault(name, {})[f"{bound}_speedup"] = round(fp32 / float(np.median(times[name])), 2)
        return found
    finally:
        torch.set_num_threads(threads)


def int8_form(found: dict) -> tuple[str, str]:
    """The int8 form the quantizers write on a host the probe ``found``, and why."""
    if found["u8s8_saturates"]:
        return SEVEN_BIT_WEIGHTS, ("U8S8 saturates on this host (16-bit pair sums, no VNNI): 7-bit weights "
                                   "(reduce_range) keep every sum exact")
    return FULL_INT8, "U8S8 sums exactly on this host (VNNI, AMX or no 16-bit pair sums): full int8 weights"


def run_probe() -> dict:
    """Probe this host now (about a second): its CPU, U8S8 saturation, the timings."""
    started = time.perf_counter()
    cpu, flags = cpu_model_and_flags()
    found = _identity(cpu, flags)
    found["half"] = time_half_precision()
    if not found["onnxruntime"]:  # nothing here writes onnxruntime's int8 forms
        return {**found, "int8": None, "probe_seconds": round(time.perf_counter() - started, 2)}
    int8 = {"u8s8_saturates": u8s8_saturates(), "u8s7_saturates": u8s8_saturates(WEIGHT_LIMITS[SEVEN_BIT_WEIGHTS])}
    form, reason = int8_form(int8)
    timings = time_int8_forms()
    return {
        **found,
        "int8": {**int8, "form": form, "reason": reason, "product_ms": timings,
                 "u8s8_speedup": round(timings["fp32"] / timings["u8s8"], 2),
                 "s8s8_speedup": round(timings["fp32"] / timings["s8s8"], 2)},
        "probe_seconds": round(time.perf_counter() - started, 2),
    }


def package_version(package: str) -> str:
    """The installed version of ``package``, or "" where it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def _identity(cpu: str, flags: list[str]) -> dict:
    return {"probe_version": PROBE_VERSION, "host": socket.gethostname(), "cpu": cpu, "cpu_flags": flags,
            "onnxruntime": package_version("onnxruntime")}


def cache_dir() -> Path:
    explicit = os.environ.get("KILN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelkiln"


def _cache_file(identity: dict) -> Path:
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"probe-{identity['host']}-{key}.json"


def cached_probe() -> dict | None:
    """This host's probe if it is kept (milliseconds: nothing is imported), else None."""
    path = _cache_file(_identity(*cpu_model_and_flags()))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def host_probe() -> dict:
    """This host's probe: from its file when one was made for this host, CPU and
    onnxruntime version, else run now and kept (a folder that cannot be written only
    means probing again in the next process)."""
    found = cached_probe()
    if found is not None:
        return found
    found = run_probe()
    path = _cache_file(_identity(found["cpu"], found["cpu_flags"]))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps(found, indent=2))
        scratch.replace(path)
    except OSError:
        pass
    return found


def host_int8_form() -> tuple[str, str]:
    """The int8 form for this host and why (see :func:`int8_form`)."""
    int8 = host_probe()["int8"]
    if int8 is None:
        raise RuntimeError("the host probe found no onnxruntime; install it before writing its int8 forms")
    return int8["form"], int8["reason"]


def describe(found: dict) -> str:
    """One line for people: the CPU, its flags and what the probe found."""
    flags = ", ".join(found["cpu_flags"]) or "no AVX2"
    int8 = found.get("int8")
    parts = [f"{found['cpu']} ({flags})"]
    if not int8:
        parts.append("onnxruntime not installed: no int8 probe")
    else:
        parts.append(f"int8 form {int8['form']}: {int8['reason']}; one product in U8S8 {int8['u8s8_speedup']}x fp32, "
                     f"S8S8 {int8['s8s8_speedup']}x (onnxruntime {found['onnxruntime']})")
    for name, figures in (found.get("half") or {}).items():
        parts.append(f"torch {name} {figures['compute_speedup']}x fp32 where arithmetic bounds a product, "
                     f"{figures['memory_speedup']}x where reading the weights does")
    return "; ".join(parts)


def half_precision_reason(found: dict, dtype: str, arithmetic_bound: bool, slower: float = 1.5) -> str | None:
    """Why this host should not build ``dtype`` (a :data:`HALF_TYPES` name) for a model
    whose products are ``arithmetic_bound`` (else bound by reading the weights): the
    probe found torch's products in it over ``slower`` times float32's there. None where
    it did not (or did not probe)."""
    figures = (found.get("half") or {}).get(dtype)
    if not figures:
        return None
    bound = "compute" if arithmetic_bound else "memory"
    speedup = figures[f"{bound}_speedup"]
    if speedup * slower > 1:
        return None
    flags = ", ".join(found["cpu_flags"]) or "no AVX2"
    return (f"the host probe found {dtype} products {1 / speedup:.1f}x slower than float32 on this host "
            f"({found['cpu']}: {flags}) where {'arithmetic' if arithmetic_bound else 'reading the weights'} bounds "
            f"them, as it does this model's: not built")
