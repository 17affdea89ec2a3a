"""Store maintenance: ``prune``, ``gc``, ``fsck``, ``du``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from casframe.cli.app import App
from casframe.cli.helpers import (
    EXIT_ERROR,
    describe_error,
    emit_json,
    format_count,
    format_size,
    iso_time,
    json_option,
    parse_with,
    pass_app,
    positive_size,
    warning_line,
)
from casframe.lazy import lazy_module
from casframe.units import parse_duration

if TYPE_CHECKING:
    from casframe import jobmetrics
else:
    # prometheus_client is loaded only when a run is asked to report metrics.
    jobmetrics = lazy_module("casframe.jobmetrics")

__all__ = ["du_command", "fsck_command", "gc_command", "prune_command"]


def _duration(value: str) -> float:
    return parse_duration(value)


def _fraction(value: str) -> float:
    try:
        fraction = float(value)
    except ValueError:
        raise ValueError(f"invalid fraction {value!r}: e.g. 0.8") from None
    if not 0 < fraction <= 1:
        raise ValueError(f"invalid fraction {value!r}: must be in (0, 1]")
    return fraction


_grace_option = click.option(
    "--grace",
    "grace_period",
    default="1h",
    show_default=True,
    metavar="DURATION",
    callback=parse_with(_duration),
    help="Spare blobs younger than this (30s, 10m, 1h, 2d or 0), so that writers still "
    "uploading before they set a ref lose nothing.",
)
_dry_run_option = click.option(
    "-n", "--dry-run", is_flag=True, help="Delete nothing; report what would go."
)
_metrics_push_option = click.option(
    "--metrics-push",
    metavar="URL",
    help="When done, push the run's metrics (objects and bytes freed, duration, time of "
    "success) to the Prometheus Pushgateway at URL.",
)
_metrics_textfile_option = click.option(
    "--metrics-textfile",
    metavar="PATH",
    type=click.Path(dir_okay=False),
    help="When done, write the run's metrics to PATH (replaced atomically), for "
    "node_exporter's textfile collector.",
)


def _check_metrics_options(push: str | None, textfile: str | None, dry_run: bool) -> None:
    if (push or textfile) and dry_run:
        raise click.UsageError(
            "--metrics-push and --metrics-textfile report what a run freed; "
            "a --dry-run frees nothing"
        )


def _publish_metrics(
    app: App, report: Any, seconds: float, push: str | None, textfile: str | None
) -> None:
    """Push or write the metrics of the run that took ``seconds``; a failure is this
    command's error (exit status 1), after the run's own report."""
    if not (push or textfile):
        return
    try:
        jobmetrics.publish(report, seconds, app.store().url, gateway=push, textfile=textfile)
    except OSError as exc:
        raise click.ClickException(describe_error(exc)) from None


def _objects(count: int, size: int) -> str:
    return f"{format_count(count, 'object')} ({format_size(size)})"


def _age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f}{unit}".replace(".0", "")
    return f"{seconds:g}s"


def _warn_ref_problems(problems: Sequence[Any]) -> None:
    for problem in problems:
        warning_line(f"ref {problem.ref}: {problem.kind} {problem.digest}: {problem.detail}")


def _ref_table(usage: Sequence[Any], *, extra: str = "") -> None:
    """One line per ref: its total and exclusive size and when it was last used."""
    if not usage:
        return
    rows = [
        (
            u.name,
            format_size(u.total_bytes),
            format_size(u.exclusive_bytes),
            iso_time(u.accessed) if u.accessed else "-",
        )
        for u in usage
    ]
    header = ("REF", "TOTAL", "EXCLUSIVE", "LAST USED")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        click.echo(
            f"{row[0].ljust(widths[0])}  {row[1].rjust(widths[1])}  "
            f"{row[2].rjust(widths[2])}  {row[3]}{extra}".rstrip()
        )


def _prune_summary(report: Any) -> str:
    verb = "would free" if report.dry_run else "freed"
    text = (
        f"{verb} {_objects(report.objects_freed, report.bytes_freed)} of "
        f"{_objects(report.objects_scanned, report.bytes_scanned)} scanned; "
        f"kept {report.objects_reachable:,} reachable from "
        f"{format_count(report.refs_checked, 'ref')}"
    )
    if report.objects_kept_young:
        text += (
            f" and {_objects(report.objects_kept_young, report.bytes_kept_young)} younger "
            f"than {_age(report.grace_period)}"
        )
    if report.temp_files_removed:
        verb = "would remove" if report.dry_run else "removed"
        text += f"; {verb} {report.temp_files_removed:,} leftover(s) of interrupted uploads"
    return text


@click.command("prune")
@_grace_option
@_dry_run_option
@_metrics_push_option
@_metrics_textfile_option
@json_option
@pass_app
def prune_command(
    app: App,
    grace_period: float,
    dry_run: bool,
    metrics_push: str | None,
    metrics_textfile: str | None,
    as_json: bool,
) -> None:
    """Delete blobs that no ref reaches.

    Marks everything reachable from every ref (through Directory trees, action results and
    asset refs), then deletes the rest unless it is younger than the grace period. With
    --dry-run, also shows per ref the bytes it alone keeps alive: what deleting it would free.
    """
    _check_metrics_options(metrics_push, metrics_textfile, dry_run)
    store = app.store()
    started = time.monotonic()
    with app.progress(as_json) as progress:
        report = store.prune(grace_period=grace_period, dry_run=dry_run, progress=progress)
    seconds = time.monotonic() - started
    if as_json:
        emit_json(report.to_dict())
    else:
        _warn_ref_problems(report.problems)
        if dry_run:
            _ref_table(report.refs)
        click.echo(_prune_summary(report))
    _publish_metrics(app, report, seconds, metrics_push, metrics_textfile)


@click.command("gc")
@click.option(
    "--max-size",
    required=True,
    metavar="SIZE",
    callback=parse_with(positive_size),
    help="Quota for the store: 500M, 10GiB, 1.5T (binary: K = KiB = 1024), or 20kB, 10GB "
    "(decimal).",
)
@click.option(
    "--low-watermark",
    default="0.8",
    show_default=True,
    metavar="FRACTION",
    callback=parse_with(_fraction),
    help="Once over the quota, expire refs until the store would fall to this fraction of it.",
)
@click.option(
    "--keep",
    multiple=True,
    metavar="PATTERN",
    help="Never expire refs matching this shell pattern (e.g. 'release/*'); repeatable.",
)
@_grace_option
@_dry_run_option
@_metrics_push_option
@_metrics_textfile_option
@json_option
@pass_app
@click.pass_context
def gc_command(
    ctx: click.Context,
    app: App,
    max_size: int,
    low_watermark: float,
    keep: tuple[str, ...],
    grace_period: float,
    dry_run: bool,
    metrics_push: str | None,
    metrics_textfile: str | None,
    as_json: bool,
) -> None:
    """Keep the store under a quota: expire least recently used refs, then prune.

    When the store holds more than --max-size, refs are deleted least recently used first
    (never one matching --keep) until what would remain after pruning fits under
    --low-watermark × --max-size; then prune runs. Exits with status 1 when the target cannot
    be reached (only protected refs or young data are left).
    """
    _check_metrics_options(metrics_push, metrics_textfile, dry_run)
    store = app.store()
    started = time.monotonic()
    with app.progress(as_json) as progress:
        report = store.gc(
            max_size=max_size, low_watermark=low_watermark, keep=keep,
            grace_period=grace_period, dry_run=dry_run, progress=progress,
        )
    seconds = time.monotonic() - started
    if as_json:
        emit_json(report.to_dict())
    else:
        state = "over" if report.over_quota else "within"
        click.echo(
            f"store holds {_objects(report.objects_before, report.bytes_before)}: {state} the "
            f"quota of {format_size(report.max_size)}"
        )
        verb = "would expire" if dry_run else "expired"
        for usage in report.refs_deleted:
            last = iso_time(usage.accessed) if usage.accessed else "never"
            click.echo(
                f"{verb} ref {usage.name} (last used {last}; alone keeps "
                f"{format_size(usage.exclusive_bytes)})"
            )
        for name in report.refs_kept:
            click.echo(f"kept ref {name} (matches --keep)")
        if report.prune is not None:
            _warn_ref_problems(report.prune.problems)
            click.echo(_prune_summary(report.prune))
        click.echo(
            f"{'would hold' if dry_run else 'now holds'} {format_size(report.predicted_bytes)}"
            f" (target {format_size(report.target_bytes)})"
        )
    _publish_metrics(app, report, seconds, metrics_push, metrics_textfile)
    if not report.reached_target:
        # Only the reasons that the options given can cause.
        reasons = ["refs matching --keep"] if keep else []
        if grace_period > 0:
            reasons.append(f"blobs younger than --grace {_age(grace_period)}")
        why = f": what is left is kept by {' or '.join(reasons)}" if reasons else ""
        warning_line(f"cannot get under {format_size(report.target_bytes)}{why}")
        ctx.exit(EXIT_ERROR)


@click.command("fsck")
@click.option(
    "--repair",
    is_flag=True,
    help="Delete corrupt blobs (nothing healthy is touched) and name the refs left incomplete.",
)
@json_option
@pass_app
@click.pass_context
def fsck_command(ctx: click.Context, app: App, repair: bool, as_json: bool) -> None:
    """Check every blob's content and every ref's tree.

    Verifies the hash and size of every stored blob, that every ref's tree is complete and
    that every Directory is canonical and safe. Prints one line per problem with its digest
    and the refs concerned; exits with status 1 when there is any.
    """
    store = app.store(create=False)
    with app.progress(as_json) as progress:
        report = store.fsck(repair=repair, progress=progress)
    for stray in report.warnings:
        warning_line(f"{stray.name}: {stray.what}; ignored")
    if as_json:
        emit_json(report.to_dict())
    else:
        for problem in report.problems:
            refs = f" (refs: {', '.join(problem.refs)})" if problem.refs else ""
            click.echo(f"{problem.kind} {problem.digest}: {problem.detail}{refs}")
        for digest in report.deleted:
            click.echo(f"deleted corrupt blob {digest}")
        for name in report.incomplete_refs:
            click.echo(f"incomplete ref {name}")
        scope = "" if report.listed else " reachable from refs (this backend cannot list)"
        found = len(report.problems)
        click.echo(
            f"checked {_objects(report.blobs_checked, report.bytes_checked)}{scope}, "
            f"{format_count(report.refs_checked, 'ref')}, "
            f"{format_count(report.directories_checked, 'directory', 'directories')}: "
            + (format_count(found, "problem") if found else "no problems")
        )
    if not report.ok:
        ctx.exit(EXIT_ERROR)


@click.command("du")
@json_option
@pass_app
def du_command(app: App, as_json: bool) -> None:
    """Show the store's size, and per ref its total and exclusive size.

    A ref's exclusive size is what no other ref keeps alive: what deleting it would free.
    Refs are listed most exclusive bytes first.
    """
    store = app.store(create=False)
    with app.progress(as_json) as progress:
        report = store.du(progress=progress)
    if as_json:
        emit_json(report.to_dict())
        return
    _warn_ref_problems(report.problems)
    _ref_table(report.refs)
    click.echo(
        f"total {_objects(report.total_objects, report.total_bytes)}: "
        f"{_objects(report.reachable_objects, report.reachable_bytes)} reachable from refs, "
        f"{_objects(report.unreachable_objects, report.unreachable_bytes)} unreachable"
    )
