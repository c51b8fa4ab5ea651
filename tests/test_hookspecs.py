"""Meta-tests that keep the plugin API honest: every hook is documented and tested."""

import inspect
from pathlib import Path

from modelkiln.plugins import hookspecs

HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("kiln_")]
TESTS = Path(__file__).parent


def test_every_hook_is_documented():
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert len(doc) > 40, f"{name} has no docstring"
        params = [p for p in inspect.signature(getattr(hookspecs, name)).parameters]
        for param in params:
            assert f":param {param}:" in doc, f"{name} does not document {param}"
        returns_none = inspect.signature(getattr(hookspecs, name)).return_annotation in (None, "None")
        assert ":returns:" in doc or returns_none, f"{name} does not document what it returns"


def test_every_hook_is_tested():
    sources = "\n".join(p.read_text() for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name)
    untested = [name for name in HOOKS if name not in sources]
    assert not untested, f"hooks with no test: {untested}"
