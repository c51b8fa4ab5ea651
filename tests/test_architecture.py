"""The import rules of the README's "Where things are", as import-linter contracts
(``[tool.importlinter]`` in pyproject.toml): layers that point one way, registry and
targets free of steps, SQL only in the store."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_readme_map_names_every_package():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    packages = sorted(p.parent.name for p in (ROOT / "modelkiln").glob("*/__init__.py"))
    missing = [name for name in packages if f"`{name}/`" not in section]
    assert not missing, f"README's map does not describe: {missing}"


def test_no_modules_import_each_other():
    """Imports inside functions count: a cycle is a pair of modules a reader must read
    together, wherever the import sits."""
    import grimp

    graph = grimp.build_graph("modelkiln", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            # An import that the imported module leads back from closes a cycle.
            pair = {module, imported}
            if graph.chain_exists(importer=imported, imported=module) and pair not in cycles:
                cycles.append(pair)
    assert not cycles, f"modules that import each other (directly or through others): {cycles}"


def test_no_class_in_the_daemon_is_over_300_lines():
    import ast

    long = []
    for path in sorted((ROOT / "modelkiln" / "daemon").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                long.append(f"{path.name}: {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, f"classes a reader cannot hold in their head: {long}"
