import pytest

from modelkiln.errors import ConfigError
from modelkiln.plugins.api import Param, Step
from modelkiln.plugins.recipes import parse_recipe, slug


class Prune(Step):
    name = "prune.magnitude"
    params = (Param("amount", float, 0.5, "share of weights"), Param("global_", bool, True, "global"))


class Quant(Step):
    name = "quantize.int8_dynamic"
    params = (Param("per_channel", bool, False, ""),)


STEPS = {"prune.magnitude": Prune(), "quantize.int8_dynamic": Quant()}


def test_baseline_is_the_empty_recipe():
    assert parse_recipe("baseline", STEPS).steps == ()
    assert parse_recipe("", STEPS).label == "baseline"


def test_chain_with_parameters_has_one_canonical_text():
    a = parse_recipe("prune.magnitude(amount=0.25) -> quantize.int8_dynamic", STEPS)
    b = parse_recipe("prune.magnitude( amount = 0.25, global_=True )->quantize.int8_dynamic()", STEPS)
    assert a.text == b.text == "prune.magnitude(amount=0.25) -> quantize.int8_dynamic"


def test_int_is_accepted_for_a_float_parameter():
    assert parse_recipe("prune.magnitude(amount=1)", STEPS).steps[0].params == (("amount", 1.0),)


@pytest.mark.parametrize(
    "text, message",
    [
        ("prune.nothing", "unknown step"),
        ("prune.magnitude(amount='x')", "must be float"),
        ("prune.magnitude(level=1)", "no parameter 'level'"),
        ("prune.magnitude(0.5)", "must be named"),
        ("prune.magnitude(amount=foo)", "literal"),
        ("???", "is not a step"),
    ],
)
def test_bad_recipes_are_clear_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe(text, STEPS, "targets.cpu.recipes")


def test_slug_is_a_safe_folder_name():
    assert slug("prune.magnitude(amount=0.25) -> quantize.int8_dynamic") == "prune.magnitude_amount=0.25+quantize.int8_dynamic"
    assert "/" not in slug("a/../b") and not slug("../x").startswith(".")
