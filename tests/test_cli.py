import json
import re
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import optimize_once
from modelkiln import hookimpl
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
    # What the host probe found: the CPU's flags and the int8 form the quantizers write here.
    assert target["host"]["int8"]["form"] in ("u8s8", "u8s7") and "avx2" in target["host"]["cpu_flags"]
    text = runner.invoke(main, ["targets", "--config", str(tmp_path / "k" / "kiln.toml")]).output
    assert f"int8 form {target['host']['int8']['form']}" in text


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
    # Variants counted as the daemon's log counts them, the inspection apart.
    line = next(line for line in runner.invoke(main, ["status", *cfg]).output.splitlines() if line.startswith("jobs:"))
    assert line.endswith("(variants); succeeded 1 (inspections)"), line
    (promoted,) = json.loads(runner.invoke(main, ["promoted", "--json", *cfg]).output)
    assert promoted["metrics"]["latency_p50_ms"] > 0
    # The int8 form is the host's, in the lineage, and the probe beside the figures.
    int8 = next(v for v in variants if v["variant"] == "onnxruntime:quantize.int8_dynamic")
    measured_on = json.loads((Path(int8["path"]) / "variant.json").read_text())["measured_on"]
    assert int8["lineage"][0]["record"]["int8_form"] == measured_on["probe"]["int8"]["form"]
    table = runner.invoke(main, ["variants", "tiny", *cfg]).output
    assert "onnxruntime:quantize.int8_dynamic" in table and "*" in table
    assert "±" in table  # the quality delta's standard error on these samples (top-1 agreement)
    assert "quantize.int8_dynamic" in runner.invoke(main, ["plugins", *cfg]).output

    # kiln report: one self-contained page (no external resource) with the plot, the
    # table, the promoted variant marked once, and the history.
    out = kiln_dir / "report"
    result = runner.invoke(main, ["report", "tiny", "--out", str(out), *cfg])
    assert result.exit_code == 0, result.output
    page = (out / "tiny.html").read_text()
    parser = PageParser()
    parser.feed(page)
    assert parser.tags["svg"] == 1 and parser.tags["table"] == 3  # variants, history, checkpoints
    assert not parser.external, parser.external
    assert page.count('stroke="#e0a100" stroke-width="3"/>') == 2  # the ring on the plot and in the legend
    assert page.count('class="promoted"') == 1 and promoted["variant"] in page
    # Circles: one per measured variant, plus the promoted ring, plus the legend's two
    # runtime dots and ring.
    assert sum(1 for v in variants if v["status"] == "succeeded") == page.count("<circle") - 4
    # Every dot carries its number, and the table the same numbers: a screenshot tells them apart.
    measured = sum(1 for v in variants if v["status"] == "succeeded")
    assert page.count('class="label"') == measured
    assert all(f'<td class=num>{n}</td>' in page for n in range(1, measured + 1))
    # Where and with what the figures were measured: host, CPU features, threads, batch
    # sizes, the inputs' shapes, software versions.
    import platform
    import socket

    context = re.search(r"<p class=sub>Measured on ([^<]*)</p>", page).group(1)
    assert socket.gethostname() in context and "batch sizes 1, 4" in context and "input float32 [batch, 16]" in context
    assert f"python {platform.python_version()}" in context and "onnxruntime " in context
    assert runner.invoke(main, ["report", "nosuchmodel", *cfg]).exit_code != 0


def test_the_report_in_a_real_browser_shows_every_point_with_its_number(chromium, config, kiln_dir,
                                                                         tiny_checkpoint, tmp_path):
    """The report as a person sees it: headless Chromium renders the page, then the same
    page with the numbers hidden; beside every dot the two screenshots differ in dark
    pixels (each number is drawn, on screen, and nothing covers it). The screenshot is
    kept at KILN_SCREENSHOTS when that names a folder (BENCHMARKS.md shows one)."""
    import os
    import shutil

    from PIL import Image, ImageChops

    import browser

    optimize_once(config, tiny_checkpoint, "tiny")
    out = kiln_dir / "report"
    cfg = ["--config", str(kiln_dir / "kiln.toml")]
    assert CliRunner().invoke(main, ["report", "tiny", "--out", str(out), *cfg]).exit_code == 0
    page = out / "tiny.html"
    html = page.read_text()
    labels = re.findall(r'<text x="([\d.]+)" y="([\d.]+)" class="label">(\d+)</text>', html)
    assert len(labels) == 4

    def variant(name, extra_head):
        copy = tmp_path / name
        copy.write_text(html.replace("</head>", extra_head + "</head>", 1))
        return copy

    shown = Image.open(browser.screenshot(chromium, page, tmp_path / "report.png")).convert("RGB")
    hidden = Image.open(browser.screenshot(
        chromium, variant("hidden.html", "<style>svg text.label { visibility: hidden; }</style>"),
        tmp_path / "hidden.png")).convert("RGB")
    # Where the plot sits on the screen, as the browser laid it out.
    script = ("<script>addEventListener('load', () => { const r = document.querySelector('svg')"
              ".getBoundingClientRect(); document.body.dataset.plot = [r.left, r.top, r.width].join(','); });"
              "</script>")
    dom = browser.dom_after_load(chromium, variant("measured.html", script))
    left, top, width = map(float, re.search(r'data-plot="([^"]+)"', dom).group(1).split(","))
    left, top, scale = left + 1, top + 1, (width - 2) / 720  # inside its 1 px border
    difference = ImageChops.difference(shown, hidden).convert("L")
    for x, y, number in labels:
        box = (int(left + float(x) * scale) - 1, int(top + (float(y) - 12) * scale) - 1,
               int(left + (float(x) + 8 * len(number)) * scale) + 2, int(top + (float(y) + 3) * scale) + 2)
        changed = sum(1 for value in difference.crop(box).getdata() if value > 64)
        dark = sum(1 for pixel in shown.crop(box).getdata() if max(pixel) < 110)
        assert changed >= 6 and dark >= 4, (number, box, changed, dark)
    assert any(abs(r - 224) < 20 and abs(g - 161) < 25 and b < 40 for r, g, b in shown.getdata())  # the ring
    if os.environ.get("KILN_SCREENSHOTS"):
        shutil.copyfile(tmp_path / "report.png", Path(os.environ["KILN_SCREENSHOTS"]) / "report.png")


def test_the_plot_keeps_its_quality_axis_near_the_bar_and_marks_what_falls_below():
    from modelkiln.config import PolicyConfig
    from modelkiln.report import plot

    def candidate(i, latency, quality):
        return {"id": i, "variant": f"torch:r{i}", "runtime": "torch", "status": "succeeded",
                "metrics": {"quality": quality, "baseline_quality": 1.0, "size_bytes": 1,
                            "batches": [{"batch_size": 1, "latency_p50_ms": latency}]}}

    svg = plot([candidate(1, 5.0, 1.0), candidate(2, 2.0, 0.995), candidate(3, 1.0, 0.36)], 2, PolicyConfig(), 1.0)
    assert svg.count("<path") == 2  # the broken variant on the bottom edge, and its legend entry
    assert "#1 torch:r3: 1 ms, quality 0.3600 (below the plotted range)" in svg
    ticks = [float(t.split("<")[0]) for t in svg.split('text-anchor="end">')[1:]]
    assert min(ticks) > 0.9  # the axis spans the variants near the bar, not 0.36 to 1.0
    # The Pareto front runs through the points as drawn: nothing below the frame.
    (front,) = re.findall(r'<polyline points="([^"]+)"', svg)
    frame = re.search(r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"', svg)
    bottom = float(frame.group(2)) + float(frame.group(4))
    assert all(float(point.split(",")[1]) <= bottom for point in front.split())
    # Two variants measured alike: their numbers side by side, not on top of each other.
    svg = plot([candidate(1, 5.0, 1.0), candidate(2, 5.0, 1.0), candidate(3, 5.0, 1.0)], 1, PolicyConfig(), 1.0)
    places = re.findall(r'<text x="([\d.]+)" y="([\d.]+)" class="label">', svg)
    assert len(set(places)) == 3
    boxes = [(float(x), float(y)) for x, y in places]
    assert all(abs(a[0] - b[0]) >= 7 or abs(a[1] - b[1]) >= 10 for i, a in enumerate(boxes) for b in boxes[i + 1:])


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.external = Counter(), []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        for name, value in attrs:
            if name in ("src", "href") and value and "://" in value:
                self.external.append(value)


def test_optimize_command_prints_the_variants(kiln_dir, tiny_checkpoint):
    out = subprocess.run([sys.executable, "-m", "modelkiln", "optimize", str(tiny_checkpoint), "--model", "tiny",
                          "--config", str(kiln_dir / "kiln.toml")], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parent)})
    assert out.returncode == 0, out.stderr
    assert "torch:quantize.int8_dynamic" in out.stdout
    # A line as each job ends, and the checkpoint's status as it changes.
    assert re.search(r"(?m)^  \d/5 torch:quantize\.int8_dynamic: succeeded$", out.stderr), out.stderr
    assert "tiny/tiny: done" in out.stderr


def test_db_upgrade(kiln_dir):
    result = CliRunner().invoke(main, ["db", "upgrade", "--config", str(kiln_dir / "kiln.toml")])
    assert result.exit_code == 0 and "head" in result.output


class Announced:
    def __init__(self):
        self.promoted = []

    @hookimpl
    def kiln_variant_promoted(self, promotion):
        self.promoted.append(promotion)


@pytest.mark.hooks("kiln_variant_promoted")
def test_promote_rollback_pin_and_unpin_by_hand(config, kiln_dir, tiny_checkpoint):
    from pathlib import Path

    from safetensors.torch import save_file

    from helpers import tiny_mlp
    from modelkiln.daemon.service import Daemon
    from modelkiln.store import queries
    from modelkiln.store.db import open_store

    cfg = ["--config", str(kiln_dir / "kiln.toml")]
    runner = CliRunner()
    first = optimize_once(config, tiny_checkpoint, "tiny", "1")
    link = config.promoted_path / "tiny" / "cpu"

    def served():
        return json.loads(runner.invoke(main, ["promoted", "--json", *cfg]).output)[0]

    before = served()
    assert before["pinned"] is None
    chosen = next(v for v in ("torch:baseline", "onnxruntime:baseline") if v != before["variant"])
    out = runner.invoke(main, ["promote", "tiny", "cpu", chosen, "--reason", "canary", *cfg])
    assert out.exit_code == 0, out.output
    now = served()
    assert now["variant"] == chosen and str(link.resolve()) == now["artifact"]
    assert now["reason"].startswith("promoted by hand by ") and now["reason"].endswith(": canary")
    assert now["pinned"] == now["reason"]

    # A running daemon announces it to plugins (the webhook) within seconds.
    announced = Announced()
    daemon = Daemon(config, watch=False, schedule=False, extra_plugins=[announced], preload=False)
    daemon.start()
    try:
        out = runner.invoke(main, ["rollback", "tiny", "cpu", *cfg])
        assert out.exit_code == 0, out.output
        deadline = __import__("time").monotonic() + 10
        while not announced.promoted and __import__("time").monotonic() < deadline:
            daemon.run_once(0.2)
    finally:
        daemon.stop(0)
    assert [p["variant"] for p in announced.promoted] == [before["variant"]]
    back = served()
    assert back["variant"] == before["variant"] and str(link.resolve()) == back["artifact"]
    assert back["reason"].startswith("rolled back by ") and back["pinned"]

    # Pinned: a new checkpoint is measured but not promoted automatically.
    save_file(tiny_mlp().state_dict(), str(tiny_checkpoint / "model.safetensors"))
    second = optimize_once(config, tiny_checkpoint, "tiny", "2")
    assert second.status == "done" and served()["version"] == "1"
    store = open_store(config)
    with store.session() as session:
        assert {p.checkpoint_id for p in queries.promotion_history(session, "tiny")} == {first.id}
    store.dispose()
    assert runner.invoke(main, ["report", "tiny", "--out", str(kiln_dir / "pinned"), *cfg]).exit_code == 0
    assert "Pinned: automatic promotions stop here until `kiln unpin tiny cpu`" in \
        (kiln_dir / "pinned" / "tiny.html").read_text()

    out = runner.invoke(main, ["unpin", "tiny", "cpu", *cfg])
    assert out.exit_code == 0 and "the policy now serves" in out.output, out.output
    assert served()["version"] == "2" and served()["reason"].startswith("unpinned by ")  # decided at once
    again = runner.invoke(main, ["unpin", "tiny", "cpu", *cfg])
    assert again.exit_code != 0 and "is not pinned" in str(again.exception or again.output)
    assert runner.invoke(main, ["rollback", "tiny", "cpu", "--to", "7", *cfg]).exit_code != 0
    assert runner.invoke(main, ["promote", "tiny", "cpu", "torch:nothing", *cfg]).exit_code != 0
    page = runner.invoke(main, ["report", "tiny", "--out", str(kiln_dir), *cfg])
    assert page.exit_code == 0 and "promoted by hand by" in Path(kiln_dir / "tiny.html").read_text()
    assert "Pinned:" not in Path(kiln_dir / "tiny.html").read_text()  # unpinned since


def test_promote_refuses_a_variant_that_misses_the_gate_unless_forced(config, kiln_dir, tiny_checkpoint):
    import re as _re

    from modelkiln.config import load_config

    path = kiln_dir / "kiln.toml"
    path.write_text(_re.sub(r"(?m)^recipes = \[[^\]]*\]", 'recipes = ["baseline", "prune.magnitude(amount=0.999)"]',
                            path.read_text()))
    optimize_once(load_config(path), tiny_checkpoint, "tiny", "1")
    cfg = ["--config", str(path)]
    runner = CliRunner()
    out = runner.invoke(main, ["promote", "tiny", "cpu", "torch:prune.magnitude(amount=0.999)", *cfg])
    assert out.exit_code != 0 and "quality gate not met" in str(out.exception) and "--force" in str(out.exception)
    out = runner.invoke(main, ["promote", "tiny", "cpu", "torch:prune.magnitude(amount=0.999)", "--force", *cfg])
    assert out.exit_code == 0, out.output
    served = json.loads(runner.invoke(main, ["promoted", "--json", *cfg]).output)[0]
    assert served["recipe"] == "prune.magnitude(amount=0.999)" and "forced past the quality gate" in served["reason"]


def test_status_lists_the_newest_and_unfinished_checkpoints_of_a_long_history(kiln_dir):
    from click.testing import CliRunner

    from modelkiln.cli import main
    from modelkiln.config import load_config
    from modelkiln.store.db import open_store
    from modelkiln.store.models import Checkpoint

    store = open_store(load_config(kiln_dir / "kiln.toml"))
    with store.session() as session:
        for n in range(1, 31):
            session.add(Checkpoint(model="m", version=str(n), registry_kind="directory", source_uri=f"/r/{n}",
                                   content_hash=f"{n:064x}", size_bytes=1, fingerprint="f", snapshot_path=f"/s/{n}",
                                   status="ready" if n == 2 else "done"))
        session.commit()
    store.dispose()
    cfg = ["--config", str(kiln_dir / "kiln.toml")]
    out = CliRunner().invoke(main, ["status", *cfg])
    assert out.exit_code == 0, out.output
    versions = [line.split()[1] for line in out.output.splitlines() if line.startswith("m ")]
    assert versions == ["2", *map(str, range(11, 31))]  # the unfinished one, then the newest 20
    assert "(the 21 newest and unfinished of 30 checkpoints; --all lists every one)" in out.output
    out = CliRunner().invoke(main, ["status", "--all", *cfg])
    assert len([line for line in out.output.splitlines() if line.startswith("m ")]) == 30


def test_variants_marks_figures_measured_on_a_busy_moment(kiln_dir):
    from click.testing import CliRunner

    from modelkiln.cli import main
    from modelkiln.config import load_config
    from modelkiln.store.db import open_store
    from modelkiln.store.models import Checkpoint, Measurement, Variant

    store = open_store(load_config(kiln_dir / "kiln.toml"))
    with store.session() as session:
        checkpoint = Checkpoint(model="m", version="1", registry_kind="directory", source_uri="/r", content_hash="h" * 64,
                                size_bytes=1, fingerprint="f", snapshot_path="/s", status="done")
        session.add(checkpoint)
        session.flush()
        for recipe, p50, p95 in (("", 86.5, 705.0), ("quantize.bf16", 24.0, 30.0)):
            variant = Variant(checkpoint_id=checkpoint.id, target="cpu", runtime="torch", recipe=recipe,
                              status="succeeded", quality_metric="cosine", quality=1.0, baseline_quality=1.0,
                              quality_delta=0.0)
            session.add(variant)
            session.flush()
            session.add(Measurement(variant_id=variant.id, batch_size=1, latency_p50_ms=p50, latency_p95_ms=p95,
                                    throughput_per_s=1.0, peak_memory_bytes=0, runs=20))
        session.commit()
    store.dispose()
    out = CliRunner().invoke(main, ["variants", "m", "--config", str(kiln_dir / "kiln.toml")])
    assert out.exit_code == 0, out.output
    lines = {line.split()[2]: line for line in out.output.splitlines() if line.strip().startswith("1 ")}
    assert "705.000 !" in lines["torch:baseline"] and "!" not in lines["torch:quantize.bf16"], out.output
    assert "!: p95 over 3x p50, measured while the host was busy" in out.output


@pytest.mark.slow
def test_the_demo_runs_beside_another_daemon_on_the_default_port_and_narrates(tmp_path):
    """`kiln demo` picks a free port, says what ends as it ends, and prints its table
    while the daemon still runs."""
    import socket

    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 9464))  # the default http.address, as another daemon would hold it
        holder.listen()
    except OSError:
        pass  # something on this host holds it already: the same situation
    try:
        out = subprocess.run([sys.executable, "-m", "modelkiln", "demo", "--dir", str(tmp_path / "demo")],
                             capture_output=True, text=True, timeout=600)
    finally:
        holder.close()
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    narrated = [line for line in lines if re.match(r"\s+\d+\.\d s  ", line)]
    assert any("cpu onnxruntime:baseline: succeeded (p50" in line for line in narrated), out.stdout
    assert any("promoted on cpu: " in line for line in narrated), out.stdout
    table = next(i for i, line in enumerate(lines) if line.startswith("* promoted."))
    assert table < lines.index("daemon stopped")


def test_an_unreachable_database_is_one_line_naming_the_file_without_the_password(kiln_dir):
    path = kiln_dir / "kiln.toml"
    path.write_text(path.read_text().replace('url = "kiln.db"', 'url = "postgresql+psycopg://kiln:s3cret@127.0.0.1:9/kiln"'))
    out = subprocess.run([sys.executable, "-m", "modelkiln", "status", "--config", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    (line,) = [line for line in out.stderr.splitlines() if line.strip()]
    assert "cannot open the database" in line and str(path) in line and "kiln:***@" in line and "s3cret" not in line
