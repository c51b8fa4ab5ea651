"""Building a variant: a step gets the model in the form it asks for."""

from pathlib import Path

import pytest

from modelkiln.pipeline.phases import _in_form
from modelkiln.errors import StepNotApplicable
from modelkiln.plugins.api import ONNX, TORCH, ModelHandle, Runtime, Step


class Exporter(Runtime):
    name = "fake-onnx"
    form = ONNX

    def __init__(self):
        self.conversions = 0

    def convert(self, model, context):
        if model.form == ONNX:
            return model
        self.conversions += 1
        return ModelHandle(ONNX, Path("exported.onnx"), model.inputs)


class Pruner(Step):
    name = "fake.prune"
    forms = {"fake-onnx": TORCH}


def test_a_model_already_in_form_is_left_alone():
    model = ModelHandle(TORCH, object(), [])
    assert _in_form(model, TORCH, Exporter(), Pruner(), None) is model


def test_the_runtime_converts_into_its_own_form():
    runtime = Exporter()
    converted = _in_form(ModelHandle(TORCH, object(), []), ONNX, runtime, Pruner(), None)
    assert converted.form == ONNX and runtime.conversions == 1


def test_a_step_needing_a_module_the_model_cannot_become_is_skipped_with_the_reason():
    # (An ONNX graph becomes a module through the importer: tests/test_conv_onnx.py.)
    with pytest.raises(StepNotApplicable, match="fake.prune needs a torch model, but this one is engine by now"):
        _in_form(ModelHandle("engine", Path("m.plan"), []), TORCH, Exporter(), Pruner(), None)


def test_a_torch_step_on_an_onnx_graph_the_importer_does_not_take_names_the_operator(tmp_path):
    """After a quantizer the graph holds int8 products, which the importer does not take:
    refused naming the operator."""
    import types

    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "quantized",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, 4]),
                               helper.make_tensor_value_info("b", TensorProto.INT8, [4, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [None, 2])])
    onnx.save_model(helper.make_model(graph), str(tmp_path / "m.onnx"))
    with pytest.raises(StepNotApplicable, match="fake.prune needs a torch model, but this one is onnx by now, and "
                                                "cannot import the ONNX graph into torch: operator MatMulInteger"):
        _in_form(ModelHandle(ONNX, tmp_path / "m.onnx", []), TORCH, Exporter(), Pruner(),
                 types.SimpleNamespace(sample_inputs={}))
