"""prune.sparse24: 2:4 masks weighed on the data, zeros held through recovery, and the
runtime's side (which weights it makes sparse). The GPU half is in test_gpu.py."""

import numpy as np
import pytest


def _model():
    import torch
    import torch.nn as nn

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 48))
            self.classifier = nn.Linear(48, 4)

        def forward(self, x):
            return self.classifier(self.body(x))

    torch.manual_seed(0)
    return Classifier().eval()


def _context(tmp_path, device="cuda"):
    from modelkiln.plugins.api import StepContext

    rows = np.random.default_rng(0).normal(size=(128, 32)).astype(np.float32)
    rows[:, ::4] *= 10  # one loud input in every group of four: its weights matter more than their size says
    # As inspect settles them: 16 quality samples, and the other rows to train on.
    return StepContext(tmp_path, "gpu", "torch", device, 1, {"x": rows[:16]}, calibration_inputs={"x": rows},
                       training_inputs={"x": rows[16:]}, training_source="calibration.npz",
                       split={"quality_rows": 16, "heldout_rows": 16, "training_rows": 112, "quality_source": "calibration.npz",
                              "training_source": "calibration.npz", "trained_on_samples": False})


def test_two_of_four_keeps_the_weights_on_loud_inputs():
    import torch

    from modelkiln.steps.sparse import two_of_four

    weight = torch.tensor([[4.0, 3.0, 2.0, 1.0, -1.0, 5.0, 0.5, -6.0]])
    assert two_of_four(weight.abs()).tolist() == [[True, True, False, False, False, True, False, True]]
    norms = torch.tensor([1.0, 1.0, 10.0, 10.0, 1.0, 1.0, 1.0, 1.0])
    assert two_of_four(weight.abs() * norms).tolist() == [[False, False, True, True, False, True, False, True]]


def test_the_pattern_is_recognised_only_where_every_group_has_two_zeros():
    import torch

    from modelkiln.steps.sparse import two_of_four
    from modelkiln.targets.semistructured import has_pattern, patterned

    torch.manual_seed(0)
    dense = torch.randn(32, 64)
    masked = dense * two_of_four(dense.abs())
    assert has_pattern(masked) and not has_pattern(dense) and not has_pattern(torch.zeros(32, 64))
    almost = masked.clone()
    almost[3, 5:8] = 1.0  # one group of four with three non-zeros
    assert not has_pattern(almost)
    layer = torch.nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight.copy_(masked)
    assert patterned(layer, any_dtype=True) == 1 and patterned(layer) == 0  # float32: not for the kernels
    assert patterned(layer.to(torch.bfloat16)) == 1


def test_sparse24_weighs_by_the_data_holds_zeros_through_recovery_and_leaves_the_head_dense(tmp_path, monkeypatch):
    import torch

    from modelkiln.errors import StepNotApplicable
    from modelkiln.plugins.api import SPARSE24, TORCH, InputSpec, ModelHandle
    from modelkiln.steps import sparse
    from modelkiln.steps.quantize import BFloat16
    from modelkiln.targets.semistructured import has_pattern
    from modelkiln.targets.torchrt import _check_sparse_weights

    monkeypatch.setattr(sparse, "_check_device", lambda device: None)  # no GPU here: the masks are the same
    model = _model()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    context = _context(tmp_path)
    spec = [InputSpec("x", "float32", ["batch", 32])]
    out = sparse.Sparse24().apply(ModelHandle(TORCH, model, spec),
                                  {"recovery_steps": 30, "learning_rate": 1e-3, "max_seconds": 60.0}, context)
    record = context.record
    assert out.notes[SPARSE24] and record["sparse_layers"] == 3 and record["sparsity"] == pytest.approx(0.5)
    assert record["dense_layers"] == {"classifier": "the model's head"}
    assert record["importance"].startswith("|weight| x input norm") and record["recovery_steps"] == 30
    assert record["importance_data"] == "calibration.npz"  # the rows apart from the quality samples
    for name in ("body.0", "body.2", "body.4"):
        weight = model.get_submodule(name).weight.detach()
        assert has_pattern(weight)  # still 2:4 after 30 updates
        assert not torch.equal(weight[weight != 0], original[f"{name}.weight"][weight != 0])  # trained
    torch.testing.assert_close(model.classifier.weight.detach(), original["classifier.weight"], rtol=0.2, atol=0.2)
    # The loud inputs' weights survive more often than the quiet ones'.
    kept = (model.body[0].weight.detach() != 0).float().mean(0).reshape(-1, 4)
    assert kept[:, 0].mean() > 0.9 and kept[:, 1:].mean() < 0.4

    with pytest.raises(StepNotApplicable, match="put quantize.bf16 .* after prune.sparse24"):
        _check_sparse_weights(model)
    _check_sparse_weights(BFloat16().apply(out, {}, context).obj)  # 16-bit: what the kernels take


def test_sparse24_is_skipped_off_the_gpu_and_skips_recovery_in_16_bits(tmp_path, monkeypatch):
    from modelkiln.errors import StepNotApplicable
    from modelkiln.plugins.api import TORCH, InputSpec, ModelHandle
    from modelkiln.steps import sparse
    from modelkiln.steps.quantize import BFloat16

    spec = [InputSpec("x", "float32", ["batch", 32])]
    params = {"recovery_steps": 30, "learning_rate": 1e-3, "max_seconds": 60.0}
    with pytest.raises(StepNotApplicable, match="NVIDIA GPUs .* device is cpu"):
        sparse.Sparse24().apply(ModelHandle(TORCH, _model(), spec), params, _context(tmp_path, "cpu"))

    monkeypatch.setattr(sparse, "_check_device", lambda device: None)
    context = _context(tmp_path)
    half = BFloat16().apply(ModelHandle(TORCH, _model(), spec), {}, context)
    context.record.clear()
    sparse.Sparse24().apply(half, params, context)
    assert context.record["recovery"].startswith("skipped: the weights are 16-bit")
    assert "recovery_steps" not in context.record and context.record["sparse_layers"] == 3
