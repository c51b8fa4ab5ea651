"""``kiln report MODEL``: one self-contained HTML page per model, for people to look at.

For each target: a plot of the objective (p50 latency at the policy's batch size, or the
decode figure it names) against quality for the newest checkpoint's variants, with the
Pareto front drawn, the quality bar dashed and the promoted variant ringed; the table of
every variant of every version; then the promotion history. Inline CSS and SVG only:
the file can be mailed, attached to a ticket or opened from a shared disk, offline.
"""

from __future__ import annotations

import math
from html import escape

from . import policy as builtin_policy
from .sizes import format_size
from .targets.decoding import summary as decoding_summary

WIDTH, HEIGHT = 720, 380
LEFT, RIGHT, TOP, BOTTOM = 70, 190, 24, 52
RUNOFF_HEAD = '<th title="p50 when timed side by side with the closest variants">run-off p50</th>'
RUNTIME_COLOURS = ["#2f6db3", "#d9822b", "#3a9a5b", "#9b59b6", "#c0392b", "#7f8c8d"]

CSS = """
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1180px;
       color: #1d232b; padding: 0 1rem; }
.scroll { overflow-x: auto; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2.4rem; border-bottom: 1px solid #d7dce2; }
.sub { color: #5b6672; margin-top: 0; }
table { border-collapse: collapse; width: 100%; margin: .8rem 0 1.2rem; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: .3rem .55rem; border-bottom: 1px solid #e6e9ed; vertical-align: top; }
th { background: #f4f6f8; font-weight: 600; } td.num { text-align: right; white-space: nowrap; }
tr.promoted td { background: #fff6dd; } .reason { color: #6b7580; min-width: 12rem; max-width: 22rem; }
small { color: #6b7580; }
.status-failed { color: #b3261e; } .status-skipped { color: #6b7580; } .status-succeeded { color: #256c3a; }
svg { background: #fff; border: 1px solid #e6e9ed; border-radius: 6px; }
svg text { font: 12px system-ui, sans-serif; fill: #38414b; }
svg text.label { font-size: 11px; font-weight: 600; }
.note { color: #5b6672; font-size: .9em; }
.pinned { background: #eef3ff; border-left: 3px solid #3b6fd8; padding: .3rem .6rem; }
"""


def _fmt(value, digits=3) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}"


def _objective_label(policy) -> str:
    if policy.objective == builtin_policy.LOAD_OBJECTIVE:
        bound = f" with p95 within {policy.p95_limit_ms:g} ms" if policy.p95_limit_ms else ""
        return f"ms per answer at the best load{bound} (1000 / requests per second)"
    if policy.objective == "decode_ms_per_token":
        return f"decode ms per token, {policy.objective_batch_size} sequences at once"
    if policy.objective in builtin_policy.DECODE_OBJECTIVES:
        return "prefill ms"
    which = "p95" if policy.objective == "latency_p95_ms" else "p50"
    return f"{which} latency ms at batch {policy.objective_batch_size}"


def _ticks(low: float, high: float, log: bool) -> list[float]:
    if log:
        ticks, step = [], 10 ** math.floor(math.log10(low))
        while step <= high * 10:
            for mult in (1, 2, 5):
                if low <= step * mult <= high:
                    ticks.append(step * mult)
            step *= 10
        return ticks
    span = high - low or abs(high) or 1.0
    raw = span / 5
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def point_numbers(candidates: list[dict], policy) -> dict[int, int]:
    """Each plotted variant's number (1 = the fastest), written beside its dot and in the
    table, so that a printout or a screenshot tells the dots apart."""
    plotted = [c for c in candidates if builtin_policy.objective_value(c, policy) is not None
               and (c.get("metrics") or {}).get("quality") is not None]
    plotted.sort(key=lambda c: (builtin_policy.objective_value(c, policy), c["id"]))
    return {c["id"]: i for i, c in enumerate(plotted, 1)}


# Where a dot's number goes, tried in turn until it overlaps no number placed before:
# up-right of the dot, down-right, up-left, down-left, then further out.
_LABEL_OFFSETS = [(8, -7), (8, 15), (-10, -7), (-10, 15), (8, -19), (8, 27)]


def _label_place(cx: float, cy: float, digits: int, placed: list) -> tuple[float, float]:
    """The (x, y) of a dot's number (text baseline, left edge for offsets to the right,
    right edge for those to the left), clear of the numbers in ``placed``, which it joins."""
    width, height = 7 * digits, 10
    for dx, dy in _LABEL_OFFSETS:
        x = cx + dx if dx > 0 else cx + dx - width
        box = (x, cy + dy - height, x + width, cy + dy)
        if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            break
    placed.append(box)
    return box[0], box[3]


def plot(candidates: list[dict], promoted_id: int | None, policy, baseline_quality: float | None) -> str:
    """An SVG scatter of objective (x) against quality (y). The quality axis spans the
    variants near the bar: one far below it (a broken variant at 0.36, say) would squeeze
    the rest into a line, so it is drawn as a triangle on the bottom edge instead."""
    points = builtin_policy.objective_and_quality(candidates, policy)
    if not points:
        return '<p class="note">No measured variant to plot.</p>'
    numbers = point_numbers(candidates, policy)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    bar: float | None = None
    floor: float | None = None
    if baseline_quality is not None:
        bar = baseline_quality * (1 - policy.max_quality_drop)
        top = max(ys + [baseline_quality])
        floor = bar - 4 * max(top - bar, 1e-6)  # four times the allowed drop below the bar
        if min(ys) >= floor:
            floor = None
        else:
            ys = [max(y, floor) for y in ys]
    x_low, x_high, log = _x_range(xs)
    y_values = ys + ([bar] if bar is not None else [])
    y_low, y_high = min(y_values), max(y_values)
    pad = (y_high - y_low) * 0.1 or 0.01
    y_low, y_high = y_low - pad, y_high + pad
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x):
        if log:
            return LEFT + (math.log(x) - math.log(x_low)) / (math.log(x_high) - math.log(x_low)) * inner_w
        return LEFT + (x - x_low) / (x_high - x_low) * inner_w

    def sy(y):
        return TOP + (1 - (y - y_low) / (y_high - y_low)) * inner_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="quality against latency">']
    for t in _ticks(max(x_low, 1e-12), x_high, log):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + inner_h}" stroke="#eef0f3"/>')
        out.append(f'<text x="{x:.1f}" y="{TOP + inner_h + 16}" text-anchor="middle">{t:g}</text>')
    for t in _ticks(y_low, y_high, False):
        y = sy(t)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + inner_w}" y2="{y:.1f}" stroke="#eef0f3"/>')
        out.append(f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{t:.4g}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{inner_w}" height="{inner_h}" fill="none" stroke="#aab3bd"/>')
    out.append(f'<text x="{LEFT + inner_w / 2}" y="{HEIGHT - 12}" text-anchor="middle">'
               f'{escape(_objective_label(policy))}{" (log scale)" if log else ""}</text>')
    out.append(f'<text transform="translate(16 {TOP + inner_h / 2}) rotate(-90)" text-anchor="middle">quality</text>')
    if bar is not None:
        y = sy(bar)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + inner_w}" y2="{y:.1f}" stroke="#b3261e" '
                   f'stroke-dasharray="5 4"><title>quality bar: {bar:.4f} '
                   f'({policy.max_quality_drop:.2%} below the baseline)</title></line>')
    front = builtin_policy.pareto_front([p[2] for p in points], policy)
    if len(front) > 1:
        # Through the points as drawn: one below the plotted range sits on the bottom edge.
        path = " ".join(f"{sx(builtin_policy.objective_value(c, policy)):.1f},"
                        f"{sy(c['metrics']['quality'] if floor is None else max(c['metrics']['quality'], floor)):.1f}"
                        for c in front)
        out.append(f'<polyline points="{path}" fill="none" stroke="#1d232b" stroke-width="1.5" opacity=".55"/>')
    runtimes = sorted({c["runtime"] for _, _, c in points})
    colour = {r: RUNTIME_COLOURS[i % len(RUNTIME_COLOURS)] for i, r in enumerate(runtimes)}
    front_ids = {c["id"] for c in front}
    placed: list[tuple[float, float, float, float]] = []
    for x, y, c in sorted(points, key=lambda p: p[2]["id"] == promoted_id):
        clipped = floor is not None and y < floor
        cx, cy = sx(x), sy(floor if clipped else y)
        title = escape(f"#{numbers[c['id']]} {c['variant']}: {x:.4g} ms, quality {y:.4f}"
                       + (" (below the plotted range)" if clipped else "")
                       + (" (Pareto front)" if c["id"] in front_ids else "")
                       + (" (promoted)" if c["id"] == promoted_id else ""))
        if c["id"] == promoted_id:
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="11" fill="none" stroke="#e0a100" stroke-width="3"/>')
        edge = 'stroke="#1d232b" stroke-width="1.5"' if c["id"] in front_ids else 'stroke="#fff" stroke-width="1"'
        if clipped:  # a downward triangle on the bottom edge: "further down than shown"
            out.append(f'<path d="M{cx - 6:.1f},{cy - 5:.1f} L{cx + 6:.1f},{cy - 5:.1f} L{cx:.1f},{cy + 5:.1f} Z" '
                       f'fill="{colour[c["runtime"]]}" {edge}><title>{title}</title></path>')
        else:
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5.5" fill="{colour[c["runtime"]]}" '
                       f'{edge}><title>{title}</title></circle>')
        lx, ly = _label_place(cx, cy, len(str(numbers[c["id"]])), placed)
        out.append(f'<text x="{lx:.1f}" y="{ly:.1f}" class="label">{numbers[c["id"]]}</text>')
    out.extend(_legend(LEFT + inner_w + 18, [(colour[r], r) for r in runtimes], bar is not None, floor is not None))
    out.append("</svg>")
    return "\n".join(out)


def _x_range(xs: list[float]) -> tuple[float, float, bool]:
    """The objective axis: its low and high ends, and whether it is a log scale."""
    x_low, x_high = min(xs), max(xs)
    # A log scale once the spread is wide: fast variants bunch up at the left otherwise.
    log = x_high / max(x_low, 1e-12) > 4
    if log:
        return x_low / 1.3, x_high * 1.3, True
    pad = (x_high - x_low) * 0.08 or x_high * 0.1 or 1.0
    return max(0.0, x_low - pad), x_high + pad, False


def _legend(lx: float, runtimes: list[tuple[str, str]], with_bar: bool, with_floor: bool) -> list[str]:
    """The legend beside the plot: a dot per runtime (colour, name), then the marks."""
    out = []
    legend = [(col, r, "dot") for col, r in runtimes] + [("#e0a100", "promoted", "ring"),
                                                       ("#1d232b", "Pareto front (outlined)", "line")]
    if with_bar:
        legend.append(("#b3261e", "quality bar", "dash"))
    if with_floor:
        legend.append(("#5b6672", "below the range shown", "triangle"))
    for i, (col, label, kind) in enumerate(legend):
        y = TOP + 12 + i * 20
        if kind == "dot":
            out.append(f'<circle cx="{lx + 6}" cy="{y - 4}" r="5.5" fill="{col}"/>')
        elif kind == "ring":
            out.append(f'<circle cx="{lx + 6}" cy="{y - 4}" r="7" fill="none" stroke="{col}" stroke-width="3"/>')
        elif kind == "triangle":
            out.append(f'<path d="M{lx},{y - 9} L{lx + 12},{y - 9} L{lx + 6},{y + 1} Z" fill="{col}"/>')
        else:
            dash = ' stroke-dasharray="5 4"' if kind == "dash" else ""
            out.append(f'<line x1="{lx}" y1="{y - 4}" x2="{lx + 14}" y2="{y - 4}" stroke="{col}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{lx + 22}" y="{y}">{escape(label)}</text>')
    return out


def _variants_table(variants: list[dict], promoted_ids: set[int], policy, numbers: dict[int, int] | None = None) -> str:
    # Causal language models get their per-token decode latency as one more column, and
    # variants timed again side by side their run-off figure.
    decoding = any((v.get("metrics") or {}).get("decode") for v in variants)
    raced = any((v.get("metrics") or {}).get("runoff") for v in variants)
    rows = []
    for v in variants:
        m = v.get("metrics") or {}
        quality = "" if m.get("quality") is None else (
            f"{m['quality']:.4f} ({m['quality_delta'] + 0.0 if abs(m['quality_delta']) >= 5e-5 else 0.0:+.4f}) <small>{escape(m.get('quality_metric') or '')}</small>")
        cls = ' class="promoted"' if v["id"] in promoted_ids else ""
        decode = (f"<td class=num>{_fmt((m.get('decode') or {}).get('decode_ms_per_token'))}</td>"
                  f"<td>{escape(decoding_summary(m.get('decode') or {}))}</td>" if decoding else "")
        runoff = f"<td class=num>{_fmt((m.get('runoff') or {}).get('latency_p50_ms'))}</td>" if raced else ""
        p50, p95 = m.get("latency_p50_ms"), m.get("latency_p95_ms")
        # A spread like a busy host's (as `kiln variants` marks it): the run-off re-times such figures.
        noisy = bool(p50 and p95 and p95 > builtin_policy.NOISY_SPREAD * p50)
        spread = (f"<span title=\"p95 over {builtin_policy.NOISY_SPREAD:g}x p50: measured while the host was busy"
                  "\">!</span>" if noisy else "")
        rows.append(
            f"<tr{cls}><td>{'&#9733;' if v['id'] in promoted_ids else ''}</td>"
            f"<td class=num>{numbers.get(v['id'], '') if numbers else ''}</td><td>{escape(v['version'])}</td>"
            f"<td>{escape(v['variant'])}</td><td class=\"status-{escape(v['status'])}\">{escape(v['status'])}</td>"
            f"<td class=num>{_fmt(p50)}</td><td class=num>{_fmt(p95)}{spread}</td>{runoff}"
            f"<td class=num>{_fmt(m.get('throughput_per_s'), 1)}</td>{decode}"
            f"<td class=num>{format_size(m.get('size_bytes'))}</td><td class=num>{quality}</td>"
            f"<td class=reason>{escape(builtin_policy.judged_on(v, policy) if m else '')}</td>"
            f"<td class=reason>{escape(v.get('reason') or '')}</td></tr>"
        )
    head = ("<tr><th></th><th title=\"its number on the plot\">#</th><th>version</th><th>variant</th><th>status</th><th>p50 ms</th><th>p95 ms</th>"
            f"{RUNOFF_HEAD if raced else ''}"
            f"<th>per s</th>{'<th>ms/token</th><th>decoding at batch (tokens per second), prefill</th>' if decoding else ''}<th>size</th><th>quality (delta)</th>"
            "<th title=\"the rows the quality was scored on, the largest drop they allow at the policy's confidence, "
            "and modelkiln's probe sentences\">judged on</th><th>reason</th></tr>")
    return f"<div class=scroll><table>{head}{''.join(rows)}</table></div>"


def _load_table(variants: list[dict], numbers: dict[int, int], policy) -> str:
    """Each variant's answers per second and p95 under each level of concurrent clients
    (``targets.<name>.concurrency``), the level the throughput objective would take in
    bold; empty where the target measures no load."""
    measured = [v for v in variants if (v.get("metrics") or {}).get("load")]
    if not measured:
        return ""
    levels = sorted({row["concurrency"] for v in measured for row in v["metrics"]["load"]})
    rows = []
    for v in sorted(measured, key=lambda v: numbers.get(v["id"], 0)):
        best = builtin_policy.best_load_level(v, policy)
        cells = {row["concurrency"]: row for row in v["metrics"]["load"]}
        shown = []
        for level in levels:
            row = cells.get(level)
            text = "" if row is None or row.get("latency_p95_ms") is None else (
                f"{row['throughput_per_s']:,.0f}/s, p95 {row['latency_p95_ms']:.2f} ms")
            shown.append(f"<td class=num>{'<b>' + text + '</b>' if row is not None and row is best else text}</td>")
        rows.append(f"<tr><td class=num>{numbers.get(v['id'], '')}</td><td>{escape(v['variant'])}</td>{''.join(shown)}</tr>")
    bound = f" within p95 {policy.p95_limit_ms:g} ms" if policy.p95_limit_ms else ""
    head = "".join(f"<th>{level} client{'s' if level > 1 else ''}</th>" for level in levels)
    return (f"<p>Under load: concurrent clients each sending a batch-1 request and waiting for its answer; "
            f"answers per second and p95 latency (bold: the most answers per second{escape(bound)}).</p>"
            f"<div class=scroll><table><tr><th>#</th><th>variant</th>{head}</tr>{''.join(rows)}</table></div>")


def measured_on(variants: list[dict]) -> str:
    """A paragraph saying where and with what the newest of ``variants`` was measured, read
    from its ``variant.json`` (the figures mean something only beside it); "" if unknown."""
    import json
    from pathlib import Path

    for variant in sorted(variants, key=lambda v: -v["id"]):
        try:
            document = json.loads((Path(variant["path"]) / "variant.json").read_text())
        except (OSError, ValueError, TypeError, KeyError):
            continue
        env = document.get("measured_on")
        if not env:
            continue
        inputs = ", ".join(f"{i['name']} {i['dtype']} [{', '.join(map(str, i['shape']))}]"
                           for i in document.get("inputs", []))
        batches = ", ".join(str(b["batch_size"]) for b in document["metrics"].get("batches", []))
        device = env.get("gpu") or f"{env.get('cpu', '?')} ({', '.join(env.get('cpu_flags') or []) or 'no AVX2'})"
        software = ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "onnxruntime", "transformers", "modelkiln")
                             if env.get(k))
        return (f"<p class=sub>Measured on {escape(env.get('host', '?'))}: {escape(device)}, "
                f"{env.get('threads')} thread(s) of {env.get('cpus')}; batch sizes {escape(batches)}; inputs "
                f"{escape(inputs)}; {escape(software)}. Latency is the median (p50) of timed runs after warm-up, "
                "p95 beside it in the table.</p>")
    return ""


def render(model: str, checkpoints: list[dict], variants: list[dict], history: list[dict],
           current: dict[str, int], policy, generated_at: str, pinned: dict[str, str] | None = None) -> str:
    """The page. ``current`` maps each target to the id of the variant served there now;
    ``pinned`` each pinned target to why (`kiln pin`, `kiln rollback`, `kiln promote`)."""
    pinned = pinned or {}
    targets = sorted({v["target"] for v in variants} | set(current))
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(model)} · modelkiln</title>"
             f"<style>{CSS}</style></head><body>"]
    parts.append(f"<h1>{escape(model)}</h1><p class=sub>modelkiln report, {escape(generated_at)} · "
                 f"{len(checkpoints)} checkpoint(s), {len(variants)} variant(s), {len(targets)} target(s) · "
                 f"policy: lowest {escape(_objective_label(policy))} within {policy.max_quality_drop:.2%} "
                 "of the baseline's quality"
                 + (f", its upper bound at {policy.confidence:.0%} confidence too" if policy.confidence > 0 else "")
                 + (f"; a variant that trained judged on {policy.min_heldout_rows}+ rows it never saw"
                    if policy.min_heldout_rows > 0 else "") + "</p>")
    for target in targets:
        on_target = [v for v in variants if v["target"] == target]
        parts.append(f"<h2>Target {escape(target)}</h2>")
        if target in pinned:
            parts.append(f"<p class=pinned>Pinned: automatic promotions stop here until `kiln unpin {escape(model)} "
                         f"{escape(target)}` ({escape(pinned[target])}).</p>")
        latest = next((c for c in reversed(checkpoints)
                       if any(v["checkpoint"] == c["content_hash"][:16] for v in on_target)), None)
        numbers = {}
        if latest is not None:
            newest = [v for v in on_target if v["checkpoint"] == latest["content_hash"][:16]
                      and v["status"] == "succeeded"]
            baseline = next((v["metrics"].get("baseline_quality") for v in newest), None)
            numbers = point_numbers(newest, policy)
            parts.append(f"<p>Version {escape(latest['version'])}: each dot is a variant, numbered as in the table "
                         "below (1 = the fastest); hover for its figures.</p>")
            parts.append(plot(newest, current.get(target), policy, baseline))
            parts.append(measured_on(newest))
            parts.append(_load_table(newest, numbers, policy))
        # Newest version first; within a version, in the order the recipes are configured.
        order = {c["content_hash"][:16]: i for i, c in enumerate(checkpoints)}
        rows = sorted(on_target, key=lambda v: (-order.get(v["checkpoint"], 0), v["id"]))
        parts.append(_variants_table(rows, {current[target]} if target in current else set(), policy, numbers))
    parts.append("<h2>Promotion history</h2>")
    if history:
        history_rows = "".join(
            f"<tr><td>{escape(p['promoted_at'][:19].replace('T', ' '))}</td><td>{escape(p['target'])}</td><td>{escape(p['version'])}</td>"
            f"<td>{escape(p['variant'])}</td><td class=num>{_fmt((p.get('metrics') or {}).get('latency_p50_ms'))}"
            f"</td><td class=reason>{escape(p.get('reason') or '')}</td></tr>" for p in history)
        parts.append("<table><tr><th>when (UTC)</th><th>target</th><th>version</th><th>variant</th><th>p50 ms</th>"
                     f"<th>why</th></tr>{history_rows}</table>")
    else:
        parts.append("<p>Nothing promoted yet.</p>")
    parts.append("<h2>Checkpoints</h2><table><tr><th>version</th><th>status</th><th>format</th><th>size</th>"
                 "<th>content hash</th><th>source</th><th>reason</th></tr>")
    for c in reversed(checkpoints):
        parts.append(f"<tr><td>{escape(c['version'])}</td><td>{escape(c['status'])}</td>"
                     f"<td>{escape(c.get('format') or '')}</td><td class=num>{format_size(c.get('size_bytes'))}</td>"
                     f"<td><code>{escape(c['content_hash'][:16])}</code></td><td>{escape(c.get('source') or '')}</td>"
                     f"<td class=reason>{escape(c.get('reason') or '')}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)
