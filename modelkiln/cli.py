"""The `kiln` command. Heavy imports live inside the commands so `kiln --help` is instant."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import KilnError
from .files import write_whole
from .sizes import format_size, printable

CONTEXT = {"help_option_names": ["-h", "--help"]}


def config_option(fn):
    return click.option(
        "--config", "config_path", type=click.Path(dir_okay=False), default=None,
        help="Configuration file (default: $KILN_CONFIG, else ./kiln.toml).",
    )(fn)


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)


def _load(config_path):
    from .config import load_config

    return load_config(config_path)


def _store(config):
    from .store.db import open_store

    return open_store(config)


def _setup_logging(level: str, fmt: str = "text") -> None:
    from .daemon.logs import setup_logging

    setup_logging(level, fmt)


def table(rows: list[list], headers: list[str]) -> str:
    cells = [[("" if c is None else printable(str(c))) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(r):
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _fmt_ms(value):
    return "" if value is None else f"{value:.3f}"


def _worst(variant: dict) -> str:
    """", worst 0.9480": the least per-sample cosine the measurement recorded, for
    encoders and other cosine-scored models."""
    worst = ((variant.get("metrics") or {}).get("checks") or {}).get("min_cosine")
    return f", worst {worst:.4f}" if isinstance(worst, (int, float)) else ""


def _fmt_quality(metrics):
    if not metrics or metrics.get("quality") is None:
        return ""
    delta = metrics["quality_delta"] + 0.0 if abs(metrics["quality_delta"]) >= 5e-5 else 0.0  # no "-0.0000"
    # The delta's standard error on these samples, where the score counts right answers.
    spread = (metrics.get("checks") or {}).get("quality_delta_se")
    return f"{metrics['quality']:.4f} ({delta:+.4f}" + (f" ±{spread:.4f})" if spread is not None else ")")


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="modelkiln")
def main():
    """modelkiln: turns every new checkpoint into the fastest variant that keeps its quality."""


def run():
    try:
        main(standalone_mode=False)
    except KilnError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False), default=".")
def init(directory):
    """Write a commented DIRECTORY/kiln.toml with the embedded defaults."""
    from .config import write_default_config

    path = write_default_config(Path(directory))
    click.echo(f"wrote {path}\nnext: drop checkpoints into {Path(directory) / 'models'}/<model>/<version>/ "
               f"and run `kiln serve --config {path}`")


@main.command()
@config_option
@click.option("--stop-timeout", type=float, default=30.0, show_default=True,
              help="Seconds running jobs get to finish on SIGTERM before they go back to pending.")
def serve(config_path, stop_timeout):
    """Run the daemon in the foreground (SIGTERM or SIGINT stops it gracefully)."""
    from .daemon.service import Daemon

    config = _load(config_path)
    _setup_logging(config.logging.level, config.logging.format)
    daemon = Daemon(config)
    daemon.install_signal_handlers()
    daemon.start()
    try:
        daemon.run_forever()
    except KeyboardInterrupt:
        stop_timeout = 0.0
    finally:
        daemon.stop(stop_timeout)


@main.command()
@config_option
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--model", help="Model name (default: the folder's parent's name).")
@click.option("--version", "version", help="Version (default: the folder's name).")
@json_option
def optimize(config_path, path, model, version, as_json):
    """Run the pipeline once on the checkpoint folder PATH, without the watcher."""
    from .daemon.service import Daemon
    from .plugins.api import FoundCheckpoint
    from .registry.directory import valid_name
    from .store import queries

    config = _load(config_path)
    _setup_logging("WARNING")
    folder = Path(path).absolute()
    model = model or folder.parent.name
    version = version or folder.name
    for kind, name in (("model", model), ("version", version)):
        if not valid_name(name):
            raise click.BadParameter(f"{kind} name {name!r} must match [A-Za-z0-9][A-Za-z0-9._+-]*; pass --{kind}")
    daemon = Daemon(config, watch=False, schedule=False)
    daemon.start()
    bars = ProgressBars(click.get_text_stream("stderr"))
    try:
        checkpoint_id = daemon.ingest_path(FoundCheckpoint(model, version, folder))
        if checkpoint_id is None:
            raise KilnError(f"{folder}: could not be ingested (see the log above)")
        while True:
            daemon.run_once(0.1)
            with daemon.store.session() as session:
                checkpoint = queries.checkpoint(session, checkpoint_id)
                jobs = queries.jobs_of(session, checkpoint_id)
                bars.show(f"{model}/{version}", checkpoint.status, jobs,
                          {job_id: daemon.executor.progress(job_id) for job_id in daemon.executor.running_jobs})
                if checkpoint.status in ("done", "rejected", "failed", "duplicate", "cancelled"):
                    break
                if not daemon.available_targets and checkpoint.status == "ready":
                    raise KilnError("no configured target is available on this host; see `kiln targets`")
    finally:
        bars.close()
        daemon.stop(5)
    if checkpoint.status in ("rejected", "failed", "cancelled"):
        raise KilnError(f"{model}/{version} {checkpoint.status}: {checkpoint.reason}")
    _print_variants(config, model, as_json=as_json)


class ProgressBars:
    """`kiln optimize`'s view of its jobs: a bar per running job (the step it is in, k of
    n where the step reports it, elapsed time), redrawn in place on a terminal and printed
    as a line every few seconds otherwise, and a line as each job ends."""

    WIDTH = 24
    PLAIN_SECONDS = 10.0

    def __init__(self, stream) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.ended: set[int] = set()
        self.drawn = 0
        self.last = 0.0
        self.status: str | None = None

    def show(self, name: str, status: str, jobs: list, reports: dict) -> None:
        import time

        from .pipeline.progress import describe
        from .sizes import format_duration
        from .store.models import utcnow
        from .store.states import TERMINAL_JOB_STATES
        from .store.views import variant_label

        lines = []
        if status != self.status:
            self.status = status
            lines.append(f"{name}: {status}")
        for job in jobs:
            if job.state in TERMINAL_JOB_STATES and job.id not in self.ended:
                self.ended.add(job.id)
                label = job.kind if job.variant is None else variant_label(job.variant)
                lines.append(f"  {len(self.ended)}/{len(jobs)} {label}: {job.state}"
                             + (f" ({job.reason})" if job.reason else ""))
        bars = []
        for job in jobs:
            if job.state != "running" or job.started_at is None:
                continue
            report = reports.get(job.id) or {}
            done, total = report.get("done"), report.get("total")
            share = done / total if done is not None and total else 0.0
            bar = "#" * int(share * self.WIDTH) + "." * (self.WIDTH - int(share * self.WIDTH))
            label = job.kind if job.variant is None else variant_label(job.variant)
            elapsed = format_duration((utcnow() - job.started_at).total_seconds())
            bars.append(f"  [{bar}] {label}  {describe(report) or 'starting'}  {elapsed}")
        now = time.monotonic()
        if self.tty:
            self._clear()
            for line in lines:
                self.stream.write(line + "\n")
            for line in bars:
                self.stream.write(line[:200] + "\n")
            self.drawn = len(bars)
        else:
            for line in lines:
                self.stream.write(line + "\n")
            if bars and now - self.last >= self.PLAIN_SECONDS:
                self.last = now
                for line in bars:
                    self.stream.write(line + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        for _ in range(self.drawn):
            self.stream.write("\x1b[1A\x1b[2K")
        self.drawn = 0

    def close(self) -> None:
        if self.tty:
            self._clear()
            self.stream.flush()


# `kiln status` lists this many checkpoints, newest first, besides those still at work.
STATUS_RECENT = 20


@main.command()
@config_option
@json_option
@click.option("--all", "show_all", is_flag=True, help="list every checkpoint, not only the recent and unfinished ones")
def status(config_path, as_json, show_all):
    """Checkpoints and their status, jobs by state, promotions."""
    from .store import queries, views

    from .pipeline.progress import describe
    from .sizes import format_duration

    config = _load(config_path)
    store = _store(config)
    with store.session() as session:
        listed = queries.checkpoints(session) if as_json or show_all else \
            queries.recent_checkpoints(session, STATUS_RECENT)
        checkpoints = [views.checkpoint_dict(c) for c in listed]
        total = queries.checkpoint_total(session)
        jobs = queries.job_counts(session)
        by_kind = {kind: queries.job_counts(session, kind) for kind in ("variant", "inspect")}
        running = [views.running_job_dict(j) for j in queries.running_jobs(session)]
        promotions = queries.served_pairs(session)
    if as_json:
        click.echo(json.dumps({"checkpoints": checkpoints, "jobs": jobs, "running": running,
                               "promotions": promotions}, indent=2))
        return
    rows = [[c["model"], c["version"], c["status"], c["format"], c["content_hash"][:12], c.get("reason", "")]
            for c in checkpoints]
    click.echo(table(rows, ["model", "version", "status", "format", "hash", "reason"]))
    if total > len(checkpoints):
        click.echo(f"(the {len(checkpoints)} newest and unfinished of {total} checkpoints; --all lists every one)")
    # Variants as the daemon's log counts them; a checkpoint's inspection apart.
    counted = {kind: ", ".join(f"{k} {v}" for k, v in sorted(c.items())) for kind, c in by_kind.items()}
    click.echo(f"\njobs: {counted['variant'] or 'none'} (variants); {counted['inspect'] or 'none'} (inspections)")
    if running:
        click.echo("\nrunning:")
        click.echo(table([[j["id"], f"{j['model']}/{j['version']}", j["target"] or "", j["variant"] or j["kind"],
                           describe(j["progress"]), format_duration(j["elapsed_seconds"]),
                           format_duration(j["left_seconds"]), j["host"]] for j in running],
                         ["job", "checkpoint", "target", "variant", "doing", "elapsed", "left (about)", "host"]))
    click.echo(f"\npromoted (model, target) pairs: {promotions}")
    from .daemon.status import disk_check

    disk = disk_check(config.artifacts_path) if config.artifacts_path.is_dir() else "ok"
    if disk != "ok":
        click.echo(f"disk: {disk}")


def _print_variants(config, model, as_json):
    variants, promoted = _variants_of(config, model)
    if as_json:
        click.echo(json.dumps(variants, indent=2))
        return
    if not variants:
        click.echo(f"no variants of model {model!r} yet")
        return
    columns = _VariantColumns.of(variants)
    click.echo(table([_variant_row(v, v["id"] in promoted, columns, config.policy) for v in variants],
                     columns.headers()))
    click.echo(columns.legend())


def _variants_of(config, model: str) -> tuple[list[dict], set[int]]:
    """The model's variants (one whose job runs shows as running, with how long so far),
    and the ids of those served now; refused for a model the catalogue has never seen."""
    from .store import queries, views

    store = _store(config)
    with store.session() as session:
        variants = views.with_parents([views.variant_dict(v) for v in queries.variants_of_model(session, model)])
        promoted = {p.variant_id for p in queries.current_promotions(session)}
        running = {variant_id: views.running_job_dict(job)
                   for variant_id, job in queries.running_of_variants(session, [v["id"] for v in variants]).items()}
    for v in variants:
        if v["id"] in running:
            v["status"] = "running"
            v["elapsed_seconds"] = running[v["id"]]["elapsed_seconds"]
    if not variants:
        with store.session() as session:
            known = bool(queries.checkpoints(session, model))
        if not known:
            raise KilnError(f"no checkpoint of model {model!r} in {config.store_shown}; `kiln status` lists the models")
    return variants, promoted


def _spread_mark(m: dict) -> str:
    from .policy import NOISY_SPREAD

    p50, p95 = m.get("latency_p50_ms"), m.get("latency_p95_ms")
    return " !" if p50 and p95 and p95 > NOISY_SPREAD * p50 else ""


def _load_curve(m: dict) -> str:
    return "  ".join(f"{row['concurrency']}: {row['throughput_per_s']:.0f}/s p95 {row['latency_p95_ms']:.2f}"
                     for row in m.get("load") or [] if row.get("latency_p95_ms") is not None)


class _VariantColumns:
    """The optional columns of ``kiln variants``: each shown where some variant has its figures."""

    def __init__(self, raced: bool, decoding: bool, loaded: bool, noisy: bool, costed: bool = False) -> None:
        self.raced = raced  # went to a run-off: its p50, timed side by side with their rivals
        self.decoding = decoding  # causal language models: their decoding figures
        self.loaded = loaded  # measured under concurrent clients: requests per second and p95 per level
        self.noisy = noisy  # a p95 far over its p50 (marked "!"), explained in the legend
        self.costed = costed  # what each build cost the host: peak memory and the bytes it newly wrote

    @classmethod
    def of(cls, variants: list[dict]) -> _VariantColumns:
        metrics = [v.get("metrics") or {} for v in variants]
        return cls(raced=any(m.get("runoff") for m in metrics), decoding=any(m.get("decode") for m in metrics),
                   loaded=any(m.get("load") for m in metrics), noisy=any(_spread_mark(m) for m in metrics),
                   costed=any((v.get("timings") or {}).get("build") for v in variants))

    def headers(self) -> list[str]:
        return ["", "version", "target", "variant", "parent", "status", "p50 ms", "p95 ms",
                *(["run-off p50"] if self.raced else []),
                *(["prefill ms", "ms/token", "batch: tokens/s, prefill"] if self.decoding else []),
                *(["under load (clients: answers/s, p95 ms)"] if self.loaded else []),
                "size", *(["build: memory, disk"] if self.costed else []), "quality (delta)", "judged on", "reason"]

    def legend(self) -> str:
        from .policy import NOISY_SPREAD
        from .targets.decoding import PROMPT_TOKENS

        return ("\n* promoted. Judged on: the rows the quality was scored on (unseen: none of them trained on), the"
                " largest drop they allow at the policy's confidence, and modelkiln's own probe sentences. Latency at"
                " the smallest batch size measured"
                + (f"; prefill of a {PROMPT_TOKENS}-token prompt and per-token decode at batch 1, then tokens per"
                   " second with that many sequences decoding at once and prefill of longer prompts."
                   if self.decoding else ".")
                + (" Run-off: the closest variants timed again side by side, interleaved in one process (at the"
                   " policy's batch size); it decided the promotion." if self.raced else "")
                + (" Build: its worker's peak resident memory, and the bytes it newly wrote to disk (weight files"
                   " another variant stored already are links, not counted)." if self.costed else "")
                + (f" !: p95 over {NOISY_SPREAD:g}x p50, measured while the host was busy; such a variant is timed"
                   " again in the run-off before it decides a promotion." if self.noisy else ""))


def _build_cost(v: dict) -> str:
    build = (v.get("timings") or {}).get("build") or {}
    if build.get("peak_host_bytes") is None:
        return ""
    return f"{format_size(build['peak_host_bytes'])}, +{format_size(build.get('new_disk_bytes') or 0)}"


def _variant_row(v: dict, promoted: bool, columns: _VariantColumns, policy) -> list:
    from .policy import judged_on
    from .sizes import format_duration
    from .targets.decoding import summary as decoding_summary

    m = v.get("metrics") or {}
    decode = m.get("decode") or {}
    return [
        "*" if promoted else "", v["version"], v["target"], v["variant"],
        (v["parent"] or "").split(":", 1)[-1],
        v["status"] + (f" {format_duration(v['elapsed_seconds'])}" if v["status"] == "running" else ""),
        _fmt_ms(m.get("latency_p50_ms")), _fmt_ms(m.get("latency_p95_ms")) + _spread_mark(m),
        *([_fmt_ms((m.get("runoff") or {}).get("latency_p50_ms"))] if columns.raced else []),
        *([_fmt_ms(decode.get("prefill_ms")), _fmt_ms(decode.get("decode_ms_per_token")),
           decoding_summary(decode)] if columns.decoding else []),
        *([_load_curve(m)] if columns.loaded else []),
        format_size(m.get("size_bytes")),
        *([_build_cost(v)] if columns.costed else []),
        (m.get("quality_metric") or "") and f"{m['quality_metric']} {_fmt_quality(m)}{_worst(v)}",
        judged_on(v, policy) if m else "",
        v.get("reason") or "",
    ]


@main.command()
@config_option
@json_option
@click.argument("model")
def variants(config_path, as_json, model):
    """Every variant of MODEL with its metrics, or why it failed or was skipped."""
    _print_variants(_load(config_path), model, as_json)


@main.command()
@config_option
@click.argument("model")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Folder to write MODEL.html into.")
def report(config_path, model, out_dir):
    """Write a self-contained HTML page for MODEL: per target a plot of latency against
    quality (Pareto front, promoted variant ringed) and the variants table, then the
    promotion history."""
    from datetime import datetime, timezone

    from .report import render
    from .store import queries, views

    config = _load(config_path)
    store = _store(config)
    with store.session() as session:
        checkpoints = [views.checkpoint_dict(c) for c in queries.checkpoints(session, model)]
        variants = [views.variant_dict(v) for v in queries.variants_of_model(session, model)]
        history = [views.promotion_dict(p, "") for p in queries.promotion_history(session, model)]
        current = {p.target: p.variant_id for p in queries.current_promotions(session) if p.model == model}
        pinned = {pin.target: pin.reason for pin in queries.pins(session) if pin.model == model}
    if not checkpoints:
        raise KilnError(f"no checkpoint of model {model!r} in {config.store_shown}; `kiln status` lists the models")
    page = render(model, checkpoints, variants, history, current, config.policy,
                  datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), pinned)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model}.html"
    write_whole(path, page.encode("utf-8"))  # a browser refreshing the page never sees half of it
    click.echo(f"wrote {path}")


@main.command()
@config_option
@json_option
@click.argument("model")
@click.argument("version", required=False)
def retry(config_path, as_json, model, version):
    """Send MODEL's failed or cancelled work back (all versions, or VERSION).

    Rejected, failed or cancelled checkpoints are inspected again; a checkpoint whose
    inspection succeeded has its failed and cancelled variant jobs run again, after which the targets they are on
    decide their promotion again. For causes outside the checkpoint's content: a factory
    added to the config, a disk freed, an overloaded host. A running daemon picks them up
    within seconds; `kiln optimize` or the next `kiln serve` otherwise.
    """
    from .store import units

    config = _load(config_path)
    with _store(config).session() as session:
        retried = units.retry_checkpoints(session, model, version)
    if not retried:
        raise KilnError(f"{model}{'/' + version if version else ''}: no rejected, failed or cancelled "
                        "checkpoint, and no failed or cancelled variant job, to retry")
    if as_json:
        click.echo(json.dumps([{"model": c.model, "version": c.version, "content_hash": c.content_hash,
                                "jobs_sent_back": jobs, "inspected_again": jobs == 0} for c, jobs in retried], indent=2))
        return
    for checkpoint, jobs in retried:
        if jobs:
            click.echo(f"{checkpoint.model}/{checkpoint.version} ({checkpoint.content_hash[:12]}): "
                       f"{jobs} failed or cancelled variant job(s) will run again")
            continue
        click.echo(f"{checkpoint.model}/{checkpoint.version} ({checkpoint.content_hash[:12]}): will be inspected again")


@main.command()
@config_option
@click.argument("model")
@click.argument("version", required=False)
@click.option("--recipe", help="Only the variants of this recipe, as `kiln variants` names it: "
                              "\"runtime:recipe\" for one runtime's, or the recipe alone for every runtime's "
                              "(\"baseline\" too).")
@click.option("--target", help="Only jobs on this target.")
def cancel(config_path, model, version, recipe, target):
    """End MODEL's pending and running jobs (all versions, or VERSION).

    They are recorded as cancelled and never run again by themselves; a running one is
    stopped by its daemon within seconds. The checkpoint's promotion is then decided among
    the variants measured so far. `kiln retry` sends cancelled work back.
    """
    from .plugins.recipes import parse_recipe
    from .store import queries, units, views

    config = _load(config_path)
    runtime = None
    if recipe is not None:
        from .plugins.manager import plugins_for

        loaded = plugins_for(config)
        runtime, recipe = views.parse_variant_label(recipe, loaded.runtimes)
        if recipe:
            recipe = parse_recipe(recipe, loaded.steps, "--recipe").text
    with _store(config).session() as session:
        jobs = [j for j in queries.open_jobs_to_cancel(session, model, version, recipe, target)
                if runtime is None or (j.variant is not None and j.variant.runtime == runtime)]
        ended = units.cancel_jobs(session, jobs, "cancelled by `kiln cancel`")
        lines = [f"job {j.id}: {j.checkpoint.model}/{j.checkpoint.version} "
                 + (f"{j.target} {views.variant_label(j.variant)}" if j.variant else j.kind)
                 + (" (was running: its daemon stops it)" if j.lease_owner else "") for j in ended]
    what = f"{model}{'/' + version if version else ''}" + (
        f" recipe {(runtime + ':') if runtime else ''}{recipe or 'baseline'}" if recipe is not None else "")
    if not lines:
        raise KilnError(f"{what}: no pending or running job to cancel")
    click.echo("\n".join(lines))
    click.echo(f"cancelled {len(lines)} job(s) of {what}; `kiln retry {model}` sends them back")


def _who() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _by_hand(config, action: str, variant_of, reason: str | None) -> None:
    """Record a promotion made by hand (pinned), swap the link, print what is served."""
    from .daemon.promoter import Promoter

    promoter = Promoter(config, None, config.promoted_path)
    with _store(config).session() as session:
        variant = variant_of(session)
        why = f"{action} by {_who()}" + (f": {reason}" if reason else "")
        promotion = promoter.promote_by_hand(session, variant, why)
        entry = promoter.describe(promotion)
    click.echo(f"{entry['model']} on {entry['target']}: now {entry['variant']} of version {entry['version']} "
               f"({entry['path']} -> {entry['artifact']}); pinned: `kiln unpin {entry['model']} {entry['target']}` "
               "hands it back to the policy")


@main.command()
@config_option
@click.argument("model")
@click.argument("target")
@click.argument("variant")
@click.option("--version", "version", help="The checkpoint version (default: the newest with that variant measured).")
@click.option("--reason", help="Why, for the promotion history.")
@click.option("--force", is_flag=True, help="Serve it even though it misses the quality gate.")
def promote(config_path, model, target, variant, version, reason, force):
    """Serve VARIANT (as `kiln variants` names it, e.g. onnxruntime:quantize.int8_dynamic)
    of MODEL on TARGET now, and pin it there.

    Recorded in the promotion history with who and why; the link is swapped at once, and a
    running daemon tells plugins (webhook) and the registry (MLflow) within seconds.
    Automatic promotions stop on a pinned target until `kiln unpin`."""
    from .policy import gate_verdict
    from .store import queries, views

    config = _load(config_path)

    def find(session):
        measured = queries.variants_of_model(session, model)
        runtime, recipe = views.parse_variant_label(variant, {v.runtime for v in measured})
        matches = [v for v in measured
                   if runtime is not None and v.target == target and v.runtime == runtime and v.recipe == recipe
                   and v.status == "succeeded" and (version is None or v.checkpoint.version == version)]
        if not matches:
            raise KilnError(f"{model}: no measured variant {variant!r} on target {target!r}"
                            + (f" of version {version}" if version else "") + "; `kiln variants " + model +
                            "` lists them")
        chosen = max(matches, key=lambda v: v.checkpoint_id)
        verdict = gate_verdict(views.variant_dict(chosen), config.policy)  # today's policy decides
        if verdict and not force:
            raise KilnError(f"{model}: {variant} of version {chosen.checkpoint.version} on {target}: {verdict}; "
                            "pass --force to serve it anyway")
        return chosen

    _by_hand(config, "promoted by hand" + (" (forced past the quality gate)" if force else ""), find, reason)


@main.command()
@config_option
@click.argument("model")
@click.argument("target")
@click.option("--to", "to_version", help="The version to go back to (default: what was served before).")
@click.option("--reason", help="Why, for the promotion history.")
def rollback(config_path, model, target, to_version, reason):
    """Serve again what MODEL served on TARGET before (or the last variant of version
    --to that was served), and pin it there until `kiln unpin`."""
    from .store import queries

    config = _load(config_path)

    def find(session):
        history = queries.promotion_history_of(session, model, target)
        if not history:
            raise KilnError(f"{model} has never been promoted on {target!r}; `kiln promoted` lists what is served")
        current = history[-1]
        earlier = [p for p in reversed(history[:-1]) if p.variant_id != current.variant_id
                   and (to_version is None or p.variant.checkpoint.version == to_version)]
        if not earlier:
            what = f"version {to_version}" if to_version else "another variant"
            raise KilnError(f"{model} on {target}: {what} was never served before; nothing to roll back to "
                            f"(`kiln report {model}` shows the history)")
        return earlier[0].variant

    _by_hand(config, f"rolled back{' to version ' + to_version if to_version else ''}", find, reason)


@main.command()
@config_option
@click.argument("model")
@click.argument("target")
@click.option("--reason", help="Why, shown with the pin.")
def pin(config_path, model, target, reason):
    """Keep MODEL on TARGET on what it serves now: automatic promotions stop there."""
    from .store import queries, units

    config = _load(config_path)
    with _store(config).session() as session:
        if queries.current_promotion(session, model, target) is None:
            raise KilnError(f"{model} is not served on {target!r}; nothing to pin (`kiln promoted` lists what is)")
        units.pin(session, model, target, f"pinned by {_who()}" + (f": {reason}" if reason else ""))
    click.echo(f"{model} on {target}: pinned; `kiln unpin {model} {target}` hands it back to the policy")


@main.command()
@config_option
@click.argument("model")
@click.argument("target")
def unpin(config_path, model, target):
    """Hand MODEL on TARGET back to the policy: the next variant measured may be promoted."""
    from .store import units

    from .daemon.promoter import Promoter
    from .plugins.manager import plugins_for
    from .store import queries, views

    config = _load(config_path)
    promoter = Promoter(config, plugins_for(config).manager, config.promoted_path)
    with _store(config).session() as session:
        if not units.unpin(session, model, target):
            raise KilnError(f"{model} on {target!r} is not pinned")
        # The policy decides now over the newest checkpoint's variants, as at its last job.
        newest = next((c for c in reversed(queries.checkpoints(session, model))
                       if c.status in ("ready", "done") and queries.variants_of(session, c.id, target)), None)
        promotion = promoter.consider(session, newest, target, by=f"unpinned by {_who()}") if newest else None
        served = queries.current_promotion(session, model, target)
        label = views.variant_label(served.variant) if served else "nothing"
    click.echo(f"{model} on {target}: unpinned; automatic promotion resumes"
               + (f"; the policy now serves {label}" if promotion else f"; {label} stays served"))


@main.command()
@config_option
@json_option
def promoted(config_path, as_json):
    """The variant served for every (model, target)."""
    from .daemon.promoter import Promoter
    from .store import queries

    config = _load(config_path)
    store = _store(config)
    promoter = Promoter(config, None, config.promoted_path)
    with store.session() as session:
        pins = {(p.model, p.target): p.reason for p in queries.pins(session)}
        entries = [{**promoter.describe(p), "pinned": pins.get((p.model, p.target))}
                   for p in queries.current_promotions(session)]
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    rows = [[e["model"], e["target"], e["version"], e["variant"], _fmt_ms(e["metrics"]["latency_p50_ms"]),
             format_size(e["metrics"]["size_bytes"]), _fmt_quality(e["metrics"]), e["path"], e["pinned"] or ""]
            for e in entries]
    click.echo(table(rows, ["model", "target", "version", "variant", "p50 ms", "size", "quality (delta)", "path",
                            "pinned"]))


@main.command()
@config_option
@json_option
def plugins(config_path, as_json):
    """Loaded plugins, where they come from, and the steps, runtimes and formats they add."""
    from .config import Config
    from .plugins.manager import plugins_for

    try:
        config = _load(config_path)
    except KilnError:
        config = Config()  # listing plugins needs no configuration
    loaded = plugins_for(config)
    steps = [
        {"step": s.name, "plugin": s.plugin, "runtimes": sorted(s.forms), "description": s.description,
         "params": [{"name": p.name, "type": p.type.__name__, "default": p.default, "description": p.description}
                    for p in s.params]}
        for s in loaded.steps.values()
    ]
    infos = [vars(p) for p in loaded.loaded]
    if as_json:
        click.echo(json.dumps({"plugins": infos, "steps": steps,
                               "runtimes": sorted(loaded.runtimes), "formats": [f.name for f in loaded.formats],
                               "registry_kinds": sorted(loaded.registry_kinds), "errors": loaded.errors}, indent=2))
        return
    click.echo(table([[p["name"], p["distribution"], p["version"], p["module"], ", ".join(p["hooks"])]
                      for p in infos], ["plugin", "package", "version", "module", "hooks"]))
    click.echo()
    rows = []
    for s in steps:
        params = ", ".join(f"{p['name']}: {p['type']} = {p['default']!r} ({p['description']})" for p in s["params"])
        rows.append([s["step"], s["plugin"], ", ".join(s["runtimes"]), s["description"], params])
    click.echo(table(rows, ["step", "plugin", "runtimes", "description", "parameters"]))
    click.echo(f"\nruntimes: {', '.join(sorted(loaded.runtimes))}")
    click.echo(f"checkpoint formats: {', '.join(f.name for f in loaded.formats)}")
    click.echo(f"registry kinds: {', '.join(sorted(loaded.registry_kinds))}")
    for name, reason in loaded.errors.items():
        click.echo(f"plugin {name} failed to load: {reason}", err=True)


@main.command()
@config_option
@json_option
def targets(config_path, as_json):
    """Configured targets, whether this host can run them, and what its CPU runs fast."""
    from .plugins.manager import plugins_for
    from .targets.devices import target_unavailable_reason
    from .targets.host import describe, host_probe

    config = _load(config_path)
    runtimes = plugins_for(config).runtimes
    entries = []
    for name, target in config.targets.items():
        reason = target_unavailable_reason(target, runtimes)
        entries.append({"target": name, "device": target.device, "runtimes": target.runtimes,
                        "threads": target.threads, "devices": target.devices, "memory_mb": target.memory_mb,
                        "batch_sizes": target.batch_sizes, "concurrency": target.concurrency,
                        "recipes": target.recipes,
                        "available": reason is None, "reason": reason})
    # What this host's CPU runs fast (targets.host): probed once, then read from its file.
    probe = host_probe() if any(t.device == "cpu" for t in config.targets.values()) else None
    for entry in entries:
        if entry["device"] == "cpu":
            entry["host"] = probe
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    click.echo(table([[e["target"], e["device"], ", ".join(e["runtimes"]), e["threads"], e["devices"],
                       e["memory_mb"] or "", ", ".join(map(str, e["batch_sizes"])),
                       ", ".join(map(str, e["concurrency"])), "yes" if e["available"] else "no",
                       e["reason"] or ""] for e in entries],
                     ["target", "device", "runtimes", "threads", "devices", "memory MiB", "batch sizes",
                      "clients under load", "available", "reason"]))
    if probe is not None:
        click.echo(f"\nthis host: {describe(probe)}")


@main.group()
def db():
    """Database schema commands."""


@db.command("upgrade")
@config_option
def db_upgrade(config_path):
    """Apply the schema migrations shipped with this modelkiln (back the file up first)."""
    from .store.db import current_revision, head_revision, open_store

    config = _load(config_path)
    store = open_store(config, allow_upgrade=True)
    click.echo(f"{config.store_shown}: at schema revision {current_revision(store.engine)} (head {head_revision()})")


@main.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="kiln-demo", show_default=True,
              help="Folder for the demo's config, models, database and artifacts.")
def demo(directory):
    """Train a small model, drop it into a watched folder, and show what gets promoted."""
    from .demo import DEMO_MODEL, run_demo

    folder = Path(directory).absolute()
    run_demo(folder, click.echo, before_stop=lambda config: _print_variants(config, DEMO_MODEL, as_json=False))
    click.echo(f"\nexplore: kiln promoted --config {folder / 'kiln.toml'}")
