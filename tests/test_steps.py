"""Built-in steps through the real pipeline on the trained digits classifier."""

import onnx
import pytest

from helpers import optimize_once
from test_pipeline import all_variants

RECIPES = 'recipes = ["baseline", "quantize.int8_dynamic"]'


@pytest.fixture
def steps_config(kiln_dir):
    from modelkiln.config import load_config

    text = (kiln_dir / "kiln.toml").read_text().replace(RECIPES, (
        'recipes = ["baseline", "quantize.int8_static", "quantize.bf16", "quantize.fp16", '
        '"prune.magnitude(amount=0.25) -> quantize.int8_dynamic", "prune.magnitude(amount=1.5)"]'))
    (kiln_dir / "kiln.toml").write_text(text)
    return load_config(kiln_dir / "kiln.toml")


def test_static_int8_and_a_prune_quantize_chain(steps_config, digits_checkpoint):
    checkpoint = optimize_once(steps_config, digits_checkpoint, "digits")
    assert checkpoint.status == "done", checkpoint.reason
    by_name = {v["variant"]: v for v in all_variants(steps_config, "digits")}
    baseline = by_name["onnxruntime:baseline"]["metrics"]["quality"]

    static = by_name["onnxruntime:quantize.int8_static"]
    assert static["status"] == "succeeded", static.get("reason")
    record = static["lineage"][0]["record"]
    assert record["calibration"] == "the checkpoint's calibration data" and record["quantize_nodes"] > 0
    graph = onnx.load(f"{static['path']}/{static['file']}").graph
    assert any(n.op_type == "DequantizeLinear" for n in graph.node)
    # Activations in uint8 (their zero points), weights in int8: the x86 kernels' fast form.
    zero_points = {t.name: t.data_type for t in graph.initializer}
    quantize = [zero_points.get(n.input[2]) for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert quantize and set(quantize) == {onnx.TensorProto.UINT8}
    assert (baseline - static["metrics"]["quality"]) / baseline <= 0.01
    assert static["metrics"]["size_bytes"] < by_name["onnxruntime:baseline"]["metrics"]["size_bytes"] / 2

    torch_static = by_name["torch:quantize.int8_static"]
    assert torch_static["status"] == "skipped"
    assert "does not serve the torch runtime" in torch_static["reason"]

    for runtime in ("onnxruntime", "torch"):
        chain = by_name[f"{runtime}:prune.magnitude(amount=0.25) -> quantize.int8_dynamic"]
        assert chain["status"] == "succeeded", chain.get("reason")
        prune_step, quant_step = chain["lineage"]
        assert prune_step["step"] == "prune.magnitude" and quant_step["step"] == "quantize.int8_dynamic"
        assert prune_step["record"]["sparsity"] == pytest.approx(0.25, abs=0.01)
        assert prune_step["params"] == {"amount": 0.25}

    for half in ("quantize.bf16", "quantize.fp16"):
        variant = by_name[f"torch:{half}"]
        assert variant["status"] == "succeeded", variant.get("reason")
        assert variant["file"] == "model.pt2"  # torch.export carries the casts: plain torch loads it
        assert variant["metrics"]["size_bytes"] < 0.6 * by_name["torch:baseline"]["metrics"]["size_bytes"]
        assert (baseline - variant["metrics"]["quality"]) / baseline <= 0.01
        assert by_name[f"onnxruntime:{half}"]["status"] == "skipped"

    bad = by_name["onnxruntime:prune.magnitude(amount=1.5)"]
    assert bad["status"] == "skipped" and "amount must be in [0, 1)" in bad["reason"]


def test_structured_pruning_really_shrinks_the_model_and_recovers(kiln_dir, trained_digits, tmp_path):
    from modelkiln.config import load_config
    from modelkiln.demo import digits_data, write_checkpoint

    text = (kiln_dir / "kiln.toml").read_text().replace(RECIPES, (
        'recipes = ["baseline", "prune.structured", "prune.structured(recovery_steps=0)"]')).replace(
        'runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]')
    (kiln_dir / "kiln.toml").write_text(text)
    config = load_config(kiln_dir / "kiln.toml")
    (x_train, _), _ = digits_data()
    folder = tmp_path / "digits"
    write_checkpoint(*trained_digits, folder, train_inputs=x_train)
    checkpoint = optimize_once(config, folder, "digits")
    assert checkpoint.status == "done", checkpoint.reason
    by_name = {v["variant"]: v for v in all_variants(config, "digits")}
    pruned = by_name["torch:prune.structured"]
    assert pruned["status"] == "succeeded", pruned.get("reason")
    record = pruned["lineage"][0]["record"]
    assert record["parameters_after"] < 0.4 * record["parameters_before"]  # half the width of each hidden layer
    assert record["recovery_data"] == "train.npz"
    baseline = by_name["torch:baseline"]["metrics"]
    assert pruned["metrics"]["size_bytes"] < baseline["size_bytes"] / 2
    assert pruned["metrics"]["quality"] >= 0.98 * baseline["quality"]
    unrecovered = by_name["torch:prune.structured(recovery_steps=0)"]
    assert "recovery_loss" not in unrecovered["lineage"][0]["record"]


def test_depth_distillation_halves_the_stack(kiln_dir, tmp_path):
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from helpers import token_task, train_tiny_transformer
    from modelkiln.config import load_config

    text = (kiln_dir / "kiln.toml").read_text().replace(RECIPES, (
        'recipes = ["baseline", "distill.depth(steps=300, learning_rate=0.001)"]'))
    text += '\n[architectures.tokens]\nfactory = "helpers:tiny_transformer"\n'
    (kiln_dir / "kiln.toml").write_text(text)
    config = load_config(kiln_dir / "kiln.toml")
    teacher, x_train = train_tiny_transformer()
    x_eval, y_eval = token_task(512, seed=2)
    with torch.no_grad():
        teacher_accuracy = float((teacher(torch.from_numpy(x_eval)).argmax(1).numpy() == y_eval).mean())
    assert teacher_accuracy > 0.6  # the task is learnt, so keeping it measures something
    folder = tmp_path / "tokens"
    folder.mkdir()
    save_file(teacher.state_dict(), str(folder / "model.safetensors"))
    np.savez(folder / "eval.npz", inputs=x_eval, labels=y_eval)
    np.savez(folder / "train.npz", inputs=x_train)
    checkpoint = optimize_once(config, folder, "tokens")
    assert checkpoint.status == "done", checkpoint.reason
    by_name = {v["variant"]: v for v in all_variants(config, "tokens")}
    for runtime in ("onnxruntime", "torch"):
        student = by_name[f"{runtime}:distill.depth(steps=300, learning_rate=0.001)"]
        assert student["status"] == "succeeded", student.get("reason")
        record = student["lineage"][0]["record"]
        assert (record["blocks_before"], record["blocks_after"]) == (4, 2)
        assert record["distill_data"] == "train.npz"
        assert record["parameters_after"] < record["parameters_before"]
        baseline = by_name[f"{runtime}:baseline"]["metrics"]
        assert student["metrics"]["quality"] >= 0.9 * baseline["quality"]


def test_lineage_names_each_variants_parent():
    from modelkiln.store.views import with_parents

    def v(recipe):
        return {"checkpoint": "c", "target": "cpu", "runtime": "torch", "recipe": recipe, "variant": f"torch:{recipe}"}

    variants = with_parents([v("baseline"), v("prune.structured"), v("prune.structured -> quantize.int8_dynamic"),
                             v("distill.depth -> quantize.int8_dynamic")])
    assert [x["parent"] for x in variants] == [
        None, "torch:baseline", "torch:prune.structured", None]  # distill.depth alone was not built


def test_accuracy_aware_quantization_rescues_a_model_with_an_outlier_channel(kiln_dir, trained_digits, tmp_path):
    import copy

    import numpy as np
    import torch

    from modelkiln.config import load_config
    from modelkiln.demo import write_checkpoint
    from modelkiln.policy import within_tolerance

    model, x_eval, y_eval = trained_digits
    model = copy.deepcopy(model)
    channel = int(np.argmax(x_eval.std(0)))
    x_outlier = x_eval.copy()
    x_outlier[:, channel] *= 1000.0  # the same function in float: the weights absorb the scale
    with torch.no_grad():
        model[0].weight[:, channel] /= 1000.0
    folder = tmp_path / "outlier"
    write_checkpoint(model, x_outlier, y_eval, folder)
    text = (kiln_dir / "kiln.toml").read_text().replace(RECIPES, (
        'recipes = ["baseline", "quantize.int8_dynamic(tune=False)", "quantize.int8_dynamic", '
        '"quantize.smooth -> quantize.int8_dynamic(tune=False)"]'))
    (kiln_dir / "kiln.toml").write_text(text)
    config = load_config(kiln_dir / "kiln.toml")
    checkpoint = optimize_once(config, folder, "digits")
    assert checkpoint.status == "done", checkpoint.reason
    by_name = {v["variant"]: v for v in all_variants(config, "digits")}
    for runtime in ("onnxruntime", "torch"):
        naive = by_name[f"{runtime}:quantize.int8_dynamic(tune=False)"]
        tuned = by_name[f"{runtime}:quantize.int8_dynamic"]
        assert naive["status"] == tuned["status"] == "succeeded", (naive["reason"], tuned["reason"])
        assert not within_tolerance(naive, config.policy), naive["metrics"]
        assert within_tolerance(tuned, config.policy), tuned["metrics"]
        record = tuned["lineage"][0]["record"]
        assert record["tuning"] == "passed"
        if runtime == "torch":  # the tuner tries SmoothQuant first: every layer stays int8
            assert record["form"] == "smoothed" and record["kept_in_float"] == []
            assert tuned["lineage"][0]["record"]["quantized_linears"] == 3
        else:  # the outlier channel sets every row's scale; smoothing the graph moves it
            # into the weights: all int8 (per-tensor activations needed alpha 0.5)
            assert [t["form"] for t in record["trials"]] == ["as configured", "smoothed (alpha 0.8)"]
            assert record["form"] == "smoothed (alpha 0.8)" and record["kept_in_float"] == []
            assert record["activations"] == "per_row"
        assert tuned["metrics"]["size_bytes"] < 0.8 * by_name[f"{runtime}:baseline"]["metrics"]["size_bytes"]
        # Smoothing moves the outlier into the weights: every layer int8, no tuning needed.
        smoothed = by_name[f"{runtime}:quantize.smooth -> quantize.int8_dynamic(tune=False)"]
        assert smoothed["status"] == "succeeded", smoothed.get("reason")
        assert within_tolerance(smoothed, config.policy), smoothed["metrics"]
        assert smoothed["lineage"][0]["record"]["smoothed_layers"] == 3


def test_weight_only_int4_and_int8_on_both_runtimes(kiln_dir, digits_checkpoint):
    import torch

    from modelkiln.config import load_config

    text = (kiln_dir / "kiln.toml").read_text().replace(RECIPES, (
        'recipes = ["baseline", "quantize.weight_only", "quantize.weight_only(bits=8)", '
        '"quantize.weight_only(bits=3)"]'))
    (kiln_dir / "kiln.toml").write_text(text)
    config = load_config(kiln_dir / "kiln.toml")
    checkpoint = optimize_once(config, digits_checkpoint, "digits")
    assert checkpoint.status == "done", checkpoint.reason
    by_name = {v["variant"]: v for v in all_variants(config, "digits")}
    for runtime in ("onnxruntime", "torch"):
        base = by_name[f"{runtime}:baseline"]["metrics"]
        for recipe, bits, smaller in (("quantize.weight_only", 4, 0.3), ("quantize.weight_only(bits=8)", 8, 0.4)):
            variant = by_name[f"{runtime}:{recipe}"]
            assert variant["status"] == "succeeded", variant.get("reason")
            assert variant["lineage"][0]["record"]["bits"] == bits
            assert (base["quality"] - variant["metrics"]["quality"]) / base["quality"] <= 0.01
            assert variant["metrics"]["size_bytes"] < smaller * base["size_bytes"]
        bad = by_name[f"{runtime}:quantize.weight_only(bits=3)"]
        assert bad["status"] == "skipped" and "bits must be 4 or 8" in bad["reason"]
    int4 = by_name["onnxruntime:quantize.weight_only"]
    graph = onnx.load(f"{int4['path']}/{int4['file']}").graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 3  # the Gemms, rewritten then quantized
    torch_int4 = by_name["torch:quantize.weight_only"]
    program = torch.export.load(f"{torch_int4['path']}/{torch_int4['file']}")  # plain torch serves it
    assert any("int4pack" in str(n.target) for n in program.graph.nodes)


def test_int8_weight_only_is_not_offered_on_cuda_and_says_why(tmp_path):
    """Without a fused dequantizing kernel int8 weights made a 7B decoding step 11x slower
    than bf16 (BENCHMARKS.md): the step refuses, before touching the model or the GPU."""
    import torch

    from modelkiln.errors import StepNotApplicable
    from modelkiln.plugins.api import TORCH, ModelHandle, StepContext
    from modelkiln.steps.weight_only import WeightOnly

    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    context = StepContext(tmp_path, "gpu", "torch", "cuda", 1, {})
    with pytest.raises(StepNotApplicable, match="int8 is not offered on cuda.*use bits=4"):
        WeightOnly().apply(ModelHandle(TORCH, model, []), {"bits": 8, "block_size": 32}, context)
    assert "int8 is not offered on cuda" in WeightOnly.description


def test_error_feedback_rounds_int4_closer_on_the_data_than_round_to_nearest(tmp_path):
    """quantize.weight_only's integers chosen by error feedback on rows apart from the
    quality samples: the products on held-out rows of the same kind are closer to the
    float model's than round-to-nearest's, on the grid compressed-tensors stores (levels
    in [-7, 7], one scale a group). Without such rows it rounds to nearest and says why,
    and records that it fitted nothing (so the held-out rule does not apply)."""
    import numpy as np
    import torch

    from modelkiln.plugins.api import TORCH, InputSpec, ModelHandle, StepContext
    from modelkiln.steps.weight_only import WeightOnly

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(8, 128)).astype(np.float32)  # inputs that move together: a low-rank cloud

    def rows(count):
        return {"x": (rng.normal(size=(count, 8)).astype(np.float32) @ mixing
                      + 0.05 * rng.normal(size=(count, 128)).astype(np.float32))}

    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
    spec = [InputSpec("x", (-1, 128), "float32")]
    held_out = torch.from_numpy(rows(256)["x"])
    with torch.no_grad():
        expected = model(held_out)
    errors = {}
    for method in ("rtn", "gptq"):
        context = StepContext(tmp_path, "cpu", "torch", "cpu", 1, {}, training_inputs=rows(512),
                              training_source="train.npz", split={"training_source": "train.npz"})
        quantized = WeightOnly().apply(ModelHandle(TORCH, model, spec),
                                       {"bits": 4, "block_size": 32, "method": method}, context).obj
        with torch.no_grad():
            errors[method] = float((quantized(held_out) - expected).norm() / expected.norm())
        assert context.record["method"] == method
        if method == "gptq":
            assert context.record["output_error"] < context.record["rtn_output_error"]
            assert context.record["fit_data"] == "train.npz" and context.record["fit_rows"] == 128
            assert int(quantized[0].compressed.q.abs().max()) <= 7
    assert errors["gptq"] < 0.8 * errors["rtn"], errors
    context = StepContext(tmp_path, "cpu", "torch", "cpu", 1, {}, split={"trained_on_samples": True})
    WeightOnly().apply(ModelHandle(TORCH, model, spec), {"bits": 4, "block_size": 32}, context)
    assert context.record["method"] == "rtn" and context.record["fitted"] is False
    assert "apart from its quality samples" in context.record["why_rtn"]
    assert WeightOnly().trains({"method": "auto"}) and not WeightOnly().trains({"method": "rtn"})


def test_head_pruning_removes_whole_attention_heads(kiln_dir, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from modelkiln.config import load_config

    text = (kiln_dir / "kiln.toml").read_text().replace(RECIPES, (
        'recipes = ["baseline", "prune.structured(amount=0.0, heads=0.5, recovery_steps=0)"]'))
    (kiln_dir / "kiln.toml").write_text(text)
    config = load_config(kiln_dir / "kiln.toml")
    folder = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, num_labels=3)).save_pretrained(str(folder), safe_serialization=True)
    checkpoint = optimize_once(config, folder, "bert")
    assert checkpoint.status == "done", checkpoint.reason
    by_name = {v["variant"]: v for v in all_variants(config, "bert")}
    for runtime in ("onnxruntime", "torch"):  # the pruned model exports and serves on both
        pruned = by_name[f"{runtime}:prune.structured(amount=0.0, heads=0.5, recovery_steps=0)"]
        assert pruned["status"] == "succeeded", pruned.get("reason")
        record = pruned["lineage"][0]["record"]
        assert (record["attention_heads_before"], record["attention_heads_after"]) == (8, 4)
        # q, k, v lose half their outputs, the attention output projection half its inputs:
        # 2 layers x (3 x 64 x 32 + 3 x 32 + 32 x 64) fewer parameters.
        assert record["parameters_before"] - record["parameters_after"] == 2 * (3 * 64 * 32 + 3 * 32 + 32 * 64)


def test_head_pruning_takes_whole_key_value_groups_of_a_rotary_grouped_query_model(tmp_path):
    import json

    import numpy as np
    import torch

    from test_decoding import tiny_llama

    from modelkiln.plugins.api import TORCH, InputSpec, ModelHandle, StepContext
    from modelkiln.steps.prune import Structured
    from modelkiln.registry.formats import hf_wrapper
    from modelkiln.targets.decoding import NEW_TOKENS, PROMPT_TOKENS, prompt_ids
    from modelkiln.targets.torchrt import TorchRuntime

    model = tiny_llama()  # 2 blocks; 4 query heads share 2 key/value heads of 16; rotary
    ids = np.random.default_rng(0).integers(0, 256, (8, 16)).astype(np.int64)
    context = StepContext(tmp_path, "cpu", "torch", "cpu", 2, {"input_ids": ids})
    handle = ModelHandle(TORCH, hf_wrapper(model), [InputSpec("input_ids", (-1, 16), "int64", 256)])
    params = {"amount": 0.0, "heads": 0.5, "recovery_steps": 0, "learning_rate": 1e-3}
    pruned = Structured().apply(handle, params, context)
    record = context.record
    assert (record["attention_heads_before"], record["attention_heads_after"], record["key_value_heads_after"]) == (
        8, 4, 2)
    # Per block one key/value group goes: 2 query heads (q rows, o columns: 2 x 32 x 64)
    # and 1 key/value head (k, v rows: 2 x 16 x 64); nothing else is touched.
    assert record["parameters_before"] - record["parameters_after"] == 2 * (2 * 32 * 64 + 2 * 16 * 64)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, 16)
    # The pruned model serves, and its static-cache decoding program (sized from the
    # updated config) generates what transformers generates from the pruned model.
    out = tmp_path / "artifact"
    out.mkdir()
    file = TorchRuntime().save(pruned, out)
    assert "file" in json.loads((out / "serving.json").read_text())["decode"]
    decode = TorchRuntime().load(out, file, "cpu", 2).time_decoding()
    expected = model.generate(torch.from_numpy(prompt_ids(256)), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False)[0, PROMPT_TOKENS:].tolist()
    assert decode["tokens"] == expected
    # With channels pruned too: torch-pruning first (its graph of the model left with one
    # key/value head never finished), heads by hand after it; the model still runs.
    context.record = {}
    both = dict(params, amount=0.5)
    handle = ModelHandle(TORCH, hf_wrapper(tiny_llama()), handle.inputs)
    Structured().apply(handle, both, context)
    assert context.record["attention_heads_after"] == 4
    assert context.record["parameters_after"] < context.record["parameters_before"] - 2 * (2 * 32 * 64 + 2 * 16 * 64)
    # One key/value head (multi-query) has no group to spare: skipped, saying why.
    from transformers import LlamaConfig, LlamaForCausalLM

    from modelkiln.errors import StepNotApplicable

    single = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=1)).eval()
    with pytest.raises(StepNotApplicable, match="fewer key/value heads than pruning takes one of"):
        Structured().apply(ModelHandle(TORCH, hf_wrapper(single), handle.inputs), params, context)


def test_smoothing_an_onnx_graph_is_exact_in_float(tmp_path):
    """One Mul per smoothed activation (q/k/v-like siblings share theirs), weights scaled
    along their input channels, for MatMul (3-D inputs) and Gemm (2-D) alike."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from modelkiln.steps.smooth import smooth_onnx

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
            self.head = torch.nn.Linear(16, 4)

        def forward(self, x):  # x: [batch, tokens, 16]
            mixed = self.q(x) * self.k(x) + self.v(x) + x
            return self.head(mixed.mean(1))  # a 2-D input: exported as a Gemm

    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(32, 5, 16)).astype(np.float32)
    x[..., 3] *= 50.0  # an outlier channel
    source = tmp_path / "model.onnx"
    torch.onnx.export(Block().eval(), (torch.from_numpy(x[:2]),), str(source), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    record = smooth_onnx(source, {"x": x}, 0.8, tmp_path / "smoothed.onnx")
    graph = onnx.load(str(tmp_path / "smoothed.onnx")).graph
    assert record["smoothed_groups"] == 2 and record["largest_scale_spread"] > 2
    assert sum(n.op_type == "Mul" and n.name.endswith(".smooth") for n in graph.node) == 2

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    expected = run(source)
    assert np.abs(run(tmp_path / "smoothed.onnx") - expected).max() <= 1e-4 * np.abs(expected).max()


def test_per_row_int8_answers_each_row_as_it_would_alone(tmp_path):
    """One activation scale per row: a sample's result is the same in any batch company
    (onnxruntime's per-tensor form moves with it), close to float, for MatMul (3-D
    inputs) and Gemm (2-D), in this host's int8 form and in 7-bit weights; excluded nodes
    stay float, ``only`` quantizes one."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from modelkiln.steps.per_row import quantizable_nodes, quantize_per_row
    from modelkiln.targets.host import SEVEN_BIT_WEIGHTS

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)
            self.head = torch.nn.Linear(32, 4)

        def forward(self, x):  # x: [batch, tokens, 32]
            return self.head((x + self.down(torch.relu(self.up(x)))).mean(1))  # 2-D: a Gemm

    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(8, 6, 32)).astype(np.float32)
    x[0] *= 40.0  # one loud sample: under one scale per batch it coarsens the others
    source = tmp_path / "model.onnx"
    torch.onnx.export(Block().eval(), (torch.from_numpy(x[:2]),), str(source), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    names = quantizable_nodes(source)
    assert len(names) == 3
    assert quantize_per_row(source, tmp_path / "rows.onnx") == 3
    graph = onnx.load(str(tmp_path / "rows.onnx")).graph
    assert sum(n.op_type == "MatMulIntegerToFloat" for n in graph.node) == 3
    assert not any(n.op_type in ("MatMul", "Gemm") for n in graph.node)

    def run(path, inputs):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": inputs})[0]

    def batched_and_alone(path):
        return run(path, x), np.concatenate([run(path, x[i:i + 1]) for i in range(len(x))])

    expected = run(source, x)
    batched, alone = batched_and_alone(tmp_path / "rows.onnx")
    quiet = slice(1, None)
    scale = np.abs(expected[quiet]).max()
    # The same up to float summation order (kernels differ by batch size), not quantization.
    assert np.abs(batched - alone).max() <= 1e-5 * np.abs(alone).max()
    assert np.abs(batched[quiet] - expected[quiet]).max() < 0.02 * scale
    # The form a host whose U8S8 kernel saturates gets (7-bit weights) meets the same
    # bounds on every host: both forms sum exactly where the probe picks them.
    assert quantize_per_row(source, tmp_path / "seven.onnx", form=SEVEN_BIT_WEIGHTS) == 3
    seven_batched, seven_alone = batched_and_alone(tmp_path / "seven.onnx")
    assert np.abs(seven_batched - seven_alone).max() <= 1e-5 * np.abs(seven_alone).max()
    assert np.abs(seven_batched[quiet] - expected[quiet]).max() < 0.02 * scale
    quantize_dynamic(str(source), str(tmp_path / "tensor.onnx"), weight_type=QuantType.QInt8)
    tensor_batched, tensor_alone = batched_and_alone(tmp_path / "tensor.onnx")
    assert np.abs(tensor_batched[quiet] - tensor_alone[quiet]).max() > 0.05 * scale  # the loud sample's scale
    assert np.abs(tensor_batched[quiet] - expected[quiet]).max() > 2 * np.abs(batched[quiet] - expected[quiet]).max()
    assert quantize_per_row(source, tmp_path / "two.onnx", excluded=frozenset(names[:1])) == 2
    assert quantize_per_row(source, tmp_path / "one.onnx", only=names[0]) == 1
    graph = onnx.load(str(tmp_path / "one.onnx")).graph
    assert sum(n.op_type in ("MatMul", "Gemm") for n in graph.node) == 2


def test_packed_low_bit_codes_round_trip():
    import torch

    from modelkiln.steps.ternary import constrain, pack, unpack

    weight = torch.randn(5, 13)
    for bits, values in ((2, {-1.0, 0.0, 1.0}), (1, {-1.0, 1.0})):
        codes, scale = constrain(weight, bits)
        assert set(codes.unique().tolist()) <= values and scale.shape == (5, 1) and (scale > 0).all()
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (5, -(-13 * bits // 8))
        assert torch.equal(unpack(packed, bits, 13), codes)


def test_ternary_and_binary_weights_recover_by_distillation_and_ship_packed(kiln_dir, trained_digits, tmp_path):
    """A trained classifier's hidden Linears constrained to 2 and 1 bit per weight and
    trained back from the original (on train.npz, apart from the eval rows that judge
    it): ternary keeps the gate and the artifact is over 8x smaller than fp32 on both
    runtimes; binary is measured and gated like any variant."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from modelkiln.config import load_config
    from modelkiln.demo import digits_data, write_checkpoint

    (x_train, _), _ = digits_data()
    digits_checkpoint = tmp_path / "digits"
    write_checkpoint(*trained_digits, digits_checkpoint, train_inputs=x_train)

    text = (kiln_dir / "kiln.toml").read_text().replace(RECIPES, (
        'recipes = ["baseline", "quantize.ternary(max_seconds=20)", "quantize.binary(max_seconds=20.0)"]'))
    (kiln_dir / "kiln.toml").write_text(text)
    config = load_config(kiln_dir / "kiln.toml")
    checkpoint = optimize_once(config, digits_checkpoint, "digits", timeout=300)
    assert checkpoint.status == "done", checkpoint.reason
    by_name = {v["variant"]: v for v in all_variants(config, "digits")}
    for runtime in ("onnxruntime", "torch"):
        base = by_name[f"{runtime}:baseline"]["metrics"]
        ternary = by_name[f"{runtime}:quantize.ternary(max_seconds=20.0)"]
        assert ternary["status"] == "succeeded", ternary.get("reason")
        assert ternary["reason"] is None, ternary["reason"]  # within the gate
        record = ternary["lineage"][0]["record"]
        assert record["bits"] == 2 and record["layers"] == 2 and record["head_float"] and record["recovery_steps"] > 0
        assert 0.2 < record["zero_share"] < 0.6
        # The weights take 1/16 (2 of 32 bits; scales and the float head beside them).
        assert record["weight_bytes_after"] * 12 < record["weight_bytes_before"]
        assert ternary["metrics"]["size_bytes"] * 8 < base["size_bytes"]
        binary = by_name[f"{runtime}:quantize.binary(max_seconds=20.0)"]
        assert binary["status"] == "succeeded", binary.get("reason")
        assert binary["lineage"][0]["record"]["bits"] == 1
        assert binary["metrics"]["size_bytes"] < ternary["metrics"]["size_bytes"]
    # Served without modelkiln: the ONNX file keeps the codes packed (uint8) and
    # onnxruntime folds their unpacking at load; the TorchScript layers unpack at their
    # first call and keep the weight (the archive holds the codes only).
    onnx_variant = by_name["onnxruntime:quantize.ternary(max_seconds=20.0)"]
    graph = onnx.load(f"{onnx_variant['path']}/{onnx_variant['file']}").graph
    assert sum(t.data_type == onnx.TensorProto.UINT8 for t in graph.initializer) == 2
    x = np.load(digits_checkpoint / "eval.npz")["inputs"][:8].astype(np.float32)
    session = ort.InferenceSession(f"{onnx_variant['path']}/{onnx_variant['file']}", providers=["CPUExecutionProvider"])
    torch_variant = by_name["torch:quantize.ternary(max_seconds=20.0)"]
    assert torch_variant["file"] == "model.pt"
    program = torch.jit.load(f"{torch_variant['path']}/{torch_variant['file']}")
    assert all(getattr(m, "weight_cache", None) is None for m in program.modules())
    with torch.inference_mode():
        served = program(torch.from_numpy(x)).numpy()
        assert np.array_equal(program(torch.from_numpy(x)).numpy(), served)  # from the kept weight
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == served.shape == (8, 10)


def test_width_distillation_narrows_mlps_and_heads_by_their_importance_on_the_data(kiln_dir, tmp_path):
    import numpy as np
    from transformers import BertConfig, BertModel

    from modelkiln.config import load_config

    text = (kiln_dir / "kiln.toml").read_text().replace(RECIPES, (
        'recipes = ["baseline", "distill.width(steps=40)", "distill.width(mlp=0.75, heads=0, steps=0)"]'))
    (kiln_dir / "kiln.toml").write_text(text)
    config = load_config(kiln_dir / "kiln.toml")
    folder = tmp_path / "bert"
    BertModel(BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         vocab_size=100)).save_pretrained(str(folder))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, size=(96, 12)).astype(np.int64)  # 64 quality samples, 32 rows to train on
    mask = np.ones_like(ids)
    mask[::2, 7:] = 0  # every other row padded after 7 tokens
    np.savez(folder / "calibration.npz", input_ids=ids * mask, attention_mask=mask, token_type_ids=0 * ids)
    checkpoint = optimize_once(config, folder, "bert")
    assert checkpoint.status == "done", checkpoint.reason
    by_name = {v["variant"]: v for v in all_variants(config, "bert")}
    for runtime in ("onnxruntime", "torch"):
        student = by_name[f"{runtime}:distill.width(steps=40)"]
        assert student["status"] == "succeeded", student.get("reason")
        record = student["lineage"][0]["record"]
        assert (record["mlp_width_before"], record["mlp_width_after"], record["mlps"]) == (128, 64, 2)
        assert (record["attention_heads_before"], record["attention_heads_after"]) == (4, 2)
        assert record["blocks_matched"] == 2 and record["distill_steps"] == 40
        assert record["importance_data"] == "calibration.npz"
        assert record["parameters_after"] < record["parameters_before"]
        assert student["metrics"]["quality"] > 0.5
        (mlp_only,) = [v["lineage"][0]["record"] for name, v in by_name.items()
                       if name.startswith(f"{runtime}:distill.width(") and "mlp=0.75" in name]
        assert mlp_only["mlp_width_after"] == 32 and "attention_heads_after" not in mlp_only


def test_width_distillation_of_a_text_classifier_narrows_its_blocks_only_and_learns_from_train_jsonl(
        kiln_dir, tmp_path):
    import json

    from test_decoding import TEXT, word_tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    from modelkiln.config import load_config

    text = (kiln_dir / "kiln.toml").read_text().replace(RECIPES, 'recipes = ["baseline", "distill.width(steps=5)"]')
    (kiln_dir / "kiln.toml").write_text(text.replace('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]'))
    config = load_config(kiln_dir / "kiln.toml")
    folder = tmp_path / "classifier"
    BertForSequenceClassification(BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                             num_attention_heads=4, vocab_size=256, num_labels=3)
                                  ).save_pretrained(str(folder))
    word_tokenizer(folder)  # no padding token: the text is padded by hand
    words = TEXT.split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    (folder / "eval.jsonl").write_text("\n".join(json.dumps({"text": line, "label": i % 3})
                                                 for i, line in enumerate(lines[:12])) + "\n")
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": line}) for line in lines[12:]) + "\n")
    checkpoint = optimize_once(config, folder, "classifier")
    assert checkpoint.status == "done", checkpoint.reason
    student = next(v for v in all_variants(config, "classifier") if v["recipe"] == "distill.width(steps=5)")
    assert student["status"] in ("succeeded", "gate_failed") and student.get("metrics"), student.get("reason")
    record = student["lineage"][0]["record"]
    # The two blocks' MLPs; not the pooler's Linear -> tanh -> classifier, which has their shape.
    assert (record["mlps"], record["mlp_width_after"]) == (2, 64)
    assert record["importance_data"] == record["distill_data"] == "train.jsonl"


def test_distillation_fits_real_tokens_only():
    import torch

    from modelkiln.steps.training import _mse

    target = torch.zeros(2, 4, 3)
    output = target.clone()
    output[0, 3] = 5.0  # a padded position of row 0
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert float(_mse(output, target, mask)) == 0.0
    output[1, 3] = 1.0  # a real token
    assert float(_mse(output, target, mask)) > 0.0
