"""Meta-tests that keep the plugin API honest: every hook is documented, and every hook
has a test that says so with ``@pytest.mark.hooks("kiln_...")`` (Datasette's rule: a
mention somewhere is not a test)."""

import ast
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


def _marked_hooks(path: Path) -> set[str]:
    """Hook names in ``@pytest.mark.hooks(...)`` on the test functions of one file."""
    marked = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
            continue
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "pytest.mark.hooks":
                marked |= {arg.value for arg in decorator.args if isinstance(arg, ast.Constant)}
    return marked


def test_every_hook_is_tested():
    marked = set().union(*(_marked_hooks(p) for p in TESTS.glob("test_*.py")))
    untested = [name for name in HOOKS if name not in marked]
    assert not untested, f"hooks with no test marked @pytest.mark.hooks(...): {untested}"
    unknown = sorted(marked - set(HOOKS))
    assert not unknown, f"tests marked with hooks that do not exist: {unknown}"
