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
