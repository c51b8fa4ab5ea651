import json
import subprocess
import sys

from click.testing import CliRunner

from helpers import optimize_once
from modelkiln.cli import main


def test_help_imports_nothing_heavy():
    code = "import sys; import modelkiln.cli; print(sorted(m for m in ('torch', 'onnxruntime', 'sqlalchemy', 'alembic', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_init_then_targets(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["init", str(tmp_path / "k")])
    assert result.exit_code == 0 and "kiln.toml" in result.output
    result = runner.invoke(main, ["targets", "--json", "--config", str(tmp_path / "k" / "kiln.toml")])
    (target,) = json.loads(result.output)
    assert target["target"] == "cpu" and target["available"] is True


def test_a_bad_config_is_an_error_exit(tmp_path):
    (tmp_path / "kiln.toml").write_text("[store]\nurll = 1\n")
    out = subprocess.run([sys.executable, "-m", "modelkiln", "status", "--config", str(tmp_path / "kiln.toml")],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "store.urll" in out.stderr and "Traceback" not in out.stderr


def test_listings_after_a_run(config, kiln_dir, tiny_checkpoint):
    optimize_once(config, tiny_checkpoint, "tiny")
    runner = CliRunner()
    cfg = ["--config", str(kiln_dir / "kiln.toml")]
    variants = json.loads(runner.invoke(main, ["variants", "tiny", "--json", *cfg]).output)
    assert len(variants) == 4
    for v in variants:
        assert {"variant", "target", "recipe", "status"} <= set(v) and ("metrics" in v or "reason" in v)
    status = json.loads(runner.invoke(main, ["status", "--json", *cfg]).output)
    assert status["checkpoints"][0]["status"] == "done"
    (promoted,) = json.loads(runner.invoke(main, ["promoted", "--json", *cfg]).output)
    assert promoted["metrics"]["latency_p50_ms"] > 0
    table = runner.invoke(main, ["variants", "tiny", *cfg]).output
    assert "onnxruntime:quantize.int8_dynamic" in table and "*" in table
    assert "quantize.int8_dynamic" in runner.invoke(main, ["plugins", *cfg]).output


def test_optimize_command_prints_the_variants(kiln_dir, tiny_checkpoint):
    out = subprocess.run([sys.executable, "-m", "modelkiln", "optimize", str(tiny_checkpoint), "--model", "tiny",
                          "--config", str(kiln_dir / "kiln.toml")], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parent)})
    assert out.returncode == 0, out.stderr
    assert "torch:quantize.int8_dynamic" in out.stdout and "jobs done" in out.stderr


def test_db_upgrade(kiln_dir):
    result = CliRunner().invoke(main, ["db", "upgrade", "--config", str(kiln_dir / "kiln.toml")])
    assert result.exit_code == 0 and "head" in result.output
