"""``modelkiln::int4_mm`` (targets/kernels/int4.py): the product of x and an int4 weight in
compressed-tensors' stored form, against ``Compressed.dequantized()``.

The torch implementation (CPU, or no Triton) is tested everywhere, with its export. The
Triton kernels run on a GPU, or on a CPU under Triton's interpreter:

    PYTHONPATH=/path/to/triton:. TRITON_INTERPRET=1 python -m pytest tests/test_int4_kernel.py

and are skipped, with the reason, where neither is possible."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from modelkiln.targets import compressed
from modelkiln.targets.kernels import int4

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if ON_GPU else "cpu"
TOKENS = (1, 3, 16, 33, 128)
# (out_features, in_features, group): small enough for the interpreter; widths that no
# tile divides (40, 96) check the masks.
LAYERS = ((64, 256, 128), (96, 128, 32), (40, 192, 64))


def needs_triton():
    if not int4.triton_available():
        pytest.skip("Triton is not installed: the Triton kernels are not tested here")
    if not (ON_GPU or INTERPRET):
        pytest.skip("no GPU: run with TRITON_INTERPRET=1 to test the Triton kernels on the CPU")
    from modelkiln.targets.kernels import int4_triton

    return int4_triton


def layer(out_features, in_features, group, dtype, seed=0, device="cpu"):
    """A quantized layer: its ``Compressed`` form and the two tensors a folder stores."""
    generator = torch.Generator().manual_seed(seed)
    form = compressed.int4_groups(torch.randn(out_features, in_features, generator=generator), group)
    form.scale = form.scale.to(dtype)  # stored in the model's float type: the reference uses the same
    stored = form.tensors(dtype)
    return form, stored["weight_packed"].to(device), stored["weight_scale"].to(device)


def inputs(tokens, in_features, dtype, seed=1, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, in_features, generator=generator).to(dtype).to(device)


def expected(form, x):
    return x.cpu().float() @ form.dequantized().t()


# Relative error bounds: the output's rounding to its float type, and the weight's to x's
# type where a kernel scales weights before the product. The interpreter truncates to bf16
# where the GPU rounds, so bf16's bound holds twice its rounding.
BOUNDS = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def assert_near(y, want, dtype):
    assert y.dtype == dtype and y.shape == want.shape
    diff = y.cpu().float() - want
    relative = (diff.norm() / want.norm()).item()
    worst = (diff.abs().max() / want.abs().max()).item()
    assert relative < BOUNDS[dtype] and worst < 2 * BOUNDS[dtype], (relative, worst)


# -- the torch implementation, everywhere -------------------------------------------------


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_dequantize_gives_the_stored_form_s_weights(group):
    form, packed, scale = layer(48, 256, group, torch.bfloat16)
    assert torch.equal(int4.dequantize(packed, scale), form.dequantized())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", LAYERS)
def test_op_answers_the_dequantized_product_on_the_cpu(shape, tokens, dtype):
    op = int4.register_op()
    form, packed, scale = layer(*shape, dtype if dtype != torch.float32 else torch.bfloat16)
    x = inputs(tokens, shape[1], dtype)
    assert_near(op(x, packed, scale), expected(form, x), dtype)


def test_int4_linear_keeps_leading_dimensions_and_adds_the_bias():
    int4.register_op()
    form, packed, scale = layer(64, 128, 32, torch.bfloat16)
    x = inputs(6, 128, torch.bfloat16).reshape(2, 3, 128)
    bias = torch.randn(64).to(torch.bfloat16)
    y = int4.int4_linear(x, packed, scale, bias)
    assert y.shape == (2, 3, 64)
    want = (expected(form, x.reshape(6, 128)) + bias.float()).reshape(2, 3, 64)
    assert_near(y, want, torch.bfloat16)


def test_op_refuses_tensors_that_are_not_one_layer():
    op = int4.register_op()
    _, packed, scale = layer(64, 128, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="do not describe one layer"):
        op(inputs(2, 256, torch.bfloat16), packed, scale)
    with pytest.raises(ValueError, match="int32"):
        op(inputs(2, 128, torch.bfloat16), packed.to(torch.int64), scale)
    assert "multiple of 16" in int4.unsupported(96, 64, 24)
    assert int4.unsupported(4096, 11008, 128) is None


def test_every_token_count_has_one_launch():
    bounds = [bound for bound, _ in int4.BY_TOKENS]
    assert bounds[-1] is None and bounds[:-1] == sorted(bounds[:-1])
    rows = int4.served_by()
    assert rows[0]["tokens"][0] == 1 and rows[-1]["tokens"][1] is None
    for before, after in zip(rows, rows[1:]):
        assert after["tokens"][0] == before["tokens"][1] + 1
    for tokens in (1, 16, 17, 64, 65, 4096):
        tiles = int4.tiles_for(tokens)
        row = next(r for r in rows if r["tokens"][0] <= tokens and (r["tokens"][1] or tokens) >= tokens)
        assert row["method"] == tiles.method and row["block_m"] == tiles.block_m


class Int4Layer(torch.nn.Module):
    def __init__(self, packed, scale):
        super().__init__()
        int4.register_op()
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", scale)

    def forward(self, x):
        return int4.int4_linear(x, self.weight_packed, self.weight_scale)


def test_export_keeps_the_op_and_the_loaded_program_answers_the_same():
    _, packed, scale = layer(64, 128, 32, torch.bfloat16)
    module = Int4Layer(packed, scale).eval()
    x = inputs(10, 128, torch.bfloat16).reshape(2, 5, 128)
    tokens = torch.export.Dim("tokens", min=2, max=4096)
    program = torch.export.export(module, (x,), dynamic_shapes={"x": {1: tokens}})
    assert "torch.ops.modelkiln.int4_mm.default" in program.graph_module.code
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    other = inputs(14, 128, torch.bfloat16, seed=2).reshape(2, 7, 128)
    assert torch.equal(loaded(other), module(other))


def test_compile_traces_the_op_without_a_graph_break():
    _, packed, scale = layer(64, 128, 32, torch.float16)
    module = Int4Layer(packed, scale).eval()
    x = inputs(4, 128, torch.float16)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), module(x))


# -- the Triton kernels: a GPU, or the interpreter -----------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", LAYERS)
def test_kernel_answers_the_dequantized_product(shape, tokens, dtype):
    """The launch the op would choose for this many tokens."""
    kernels = needs_triton()
    form, packed, scale = layer(*shape, dtype, device=DEVICE)
    x = inputs(tokens, shape[1], dtype, device=DEVICE)
    assert_near(kernels.launch(x, packed, scale, int4.tiles_for(tokens)), expected(form, x), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("row", range(len(int4.BY_TOKENS)))
def test_every_launch_of_the_table_answers_for_any_token_count(row, dtype):
    kernels = needs_triton()
    tiles = int4.BY_TOKENS[row][1]
    form, packed, scale = layer(40, 192, 64, dtype, device=DEVICE)
    x = inputs(33, 192, dtype, device=DEVICE)
    assert_near(kernels.launch(x, packed, scale, tiles), expected(form, x), dtype)


# Tiles the table may come to use: a K step spanning several groups (scales per word),
# inside a group with the scale after the dot, K not a whole number of steps, split-K
# with slices of unequal length, a channel-wise scale (one group of K), the smallest group.
EDGES = {
    "step spans groups": (int4.Tiles(16, 32, 128), (64, 256, 32)),
    "step inside a group": (int4.Tiles(32, 32, 32, split_k=2), (64, 256, 128)),
    "ragged K": (int4.Tiles(16, 32, 64, scale_after_dot=False), (32, 96, 32)),
    "uneven split-K": (int4.Tiles(16, 16, 32, split_k=3), (16, 256, 64)),
    "channel-wise scale": (int4.Tiles(64, 32, 64, split_k=2), (48, 128, 128)),
    "groups of 8": (int4.Tiles(16, 32, 64), (32, 128, 8)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("edge", sorted(EDGES))
def test_kernel_edges(edge, dtype):
    kernels = needs_triton()
    tiles, shape = EDGES[edge]
    form, packed, scale = layer(*shape, dtype, device=DEVICE)
    x = inputs(5, shape[1], dtype, device=DEVICE)
    assert_near(kernels.launch(x, packed, scale, tiles), expected(form, x), dtype)


def test_dequantize_kernel_gives_the_stored_form_s_weights():
    kernels = needs_triton()
    form, packed, scale = layer(40, 192, 64, torch.float16, device=DEVICE)
    weight = kernels.dequantize(packed, scale, torch.float16, int4.Tiles(0, 32, 128, method="dequantize"))
    assert torch.equal(weight.cpu(), form.dequantized().to(torch.float16))


COMPILE_TABLE = """
from modelkiln.targets.kernels import int4, int4_triton
for bound, tiles in int4.BY_TOKENS:
    int4_triton.compile_for(tiles, (9, 0))
"""


def test_every_launch_of_the_table_compiles_for_hopper():
    """What an edit of BY_TOKENS must pass, on any machine with Triton (its bundled ptxas
    compiles for sm_90 without a GPU); in a process of its own, without the interpreter."""
    if not int4.triton_available():
        pytest.skip("Triton is not installed: the Triton kernels are not compiled here")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_TABLE], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: the op runs its Triton kernels on cuda only")
@pytest.mark.parametrize("tokens", (1, 16, 32, 64, 128, 512, 2048))
def test_op_on_the_gpu_eager_and_compiled(tokens):
    needs_triton()
    op = int4.register_op()
    form, packed, scale = layer(512, 1024, 128, torch.bfloat16, device="cuda")
    x = inputs(tokens, 1024, torch.bfloat16, device="cuda")
    assert_near(op(x, packed, scale), expected(form, x), torch.bfloat16)
    compiled = torch.compile(Int4Layer(packed, scale))
    assert_near(compiled(x), expected(form, x), torch.bfloat16)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: the op runs its Triton kernels on cuda only")
def test_a_program_exported_on_the_gpu_serves_every_token_count():
    """The fake implementation keeps export from pinning the tokens to one row of BY_TOKENS."""
    needs_triton()
    form, packed, scale = layer(256, 512, 128, torch.bfloat16, device="cuda")
    tokens = torch.export.Dim("tokens", min=2, max=4096)
    program = torch.export.export(Int4Layer(packed, scale), (inputs(8, 512, torch.bfloat16, device="cuda"),),
                                  dynamic_shapes={"x": {0: tokens}})
    for count in (3, 40, 300, 1000):
        x = inputs(count, 512, torch.bfloat16, seed=count, device="cuda")
        assert_near(program.module()(x), expected(form, x), torch.bfloat16)
