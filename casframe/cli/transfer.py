"""``push`` and ``pull``: copying trees between stores, one or the configured remotes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from casframe.cli.app import App
from casframe.cli.helpers import (
    emit_json,
    format_count,
    format_size,
    json_option,
    pass_app,
)
from casframe.remotes import Remotes, RemoteStatus

if TYPE_CHECKING:
    from casframe.remotes import RemoteOutcome
    from casframe.store import Store
    from casframe.transfer import TransferResult

__all__ = ["pull_command", "push_command"]


def _report_transfer(
    result: TransferResult, verb: str, source: Store, dest: Store, as_json: bool
) -> None:
    if as_json:
        emit_json(
            {
                "root": str(result.root),
                "ref": result.ref,
                "source": source.url,
                "destination": dest.url,
                "blobs_total": result.blobs_total,
                "blobs_sent": result.blobs_sent,
                "bytes_sent": result.bytes_sent,
                "already_present": result.already_present,
            }
        )
        return
    where = f"to {dest.url}" if verb == "pushed" else f"from {source.url}"
    if result.already_present:
        what = f"already present ({format_count(result.blobs_total, 'blob')})"
    else:
        what = (
            f"copied {result.blobs_sent:,} of {format_count(result.blobs_total, 'blob')} "
            f"({format_size(result.bytes_sent)})"
        )
    ref = f"; ref {result.ref} set" if result.ref else ""
    click.echo(f"{verb} {result.root} {where}: {what}{ref}")


_remote_option = click.option(
    "--remote",
    "remote_names",
    multiple=True,
    metavar="NAME",
    help="Use only this configured remote (repeatable).",
)
_timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Seconds each remote has to answer (default: its own 'timeout', else 10).",
)


def _single_store_only(option: str, remote_names: tuple[str, ...], timeout: float | None) -> None:
    if remote_names or timeout is not None:
        raise click.UsageError(f"{option} names one store: --remote and --timeout do not apply")


def _configured_remotes(app: App, names: tuple[str, ...]) -> Remotes:
    remotes = Remotes.from_config(app.config())
    if app.digest_function:
        remotes = remotes.with_digest_function(app.digest_function)
    return remotes.select(names) if names else remotes


def _outcome_line(outcome: RemoteOutcome) -> str:
    """One human line per remote: what was sent, why it was skipped, what went wrong."""
    status, name, result = outcome.status, outcome.name, outcome.transfer
    if status is RemoteStatus.MISSING:
        return f"skipped {name}: {outcome.message}"
    if status is RemoteStatus.UNREACHABLE:
        return f"unreachable {name}: {outcome.message}"
    if status is RemoteStatus.READ_ONLY:
        return f"read-only {name}: not pushed ({outcome.message})"
    if status is RemoteStatus.FAILED or result is None:
        return f"failed {name}: {outcome.message}"
    ref_note = f"; ref {outcome.ref} set" if outcome.ref_set else ""
    if status is RemoteStatus.UP_TO_DATE:
        kept = f", ref {outcome.ref}" if outcome.ref else ""
        blobs = format_count(result.blobs_total, "blob")
        return f"up to date {name}: already has it ({blobs}{kept})"
    sent = f"{format_count(result.blobs_sent, 'blob')}, {format_size(result.bytes_sent)}"
    if result.blobs_sent == 0:
        sent = f"0 blobs, all {result.blobs_total:,} already there"
    verb = "pulled from" if status is RemoteStatus.PULLED else "pushed to"
    return f"{verb} {name}: {sent}{ref_note}"


def _through_remotes(
    app: App,
    operation: str,
    tree: str,
    ref_name: str | None,
    remote_names: tuple[str, ...],
    timeout: float | None,
    as_json: bool,
) -> None:
    """Pull from or push to the configured remotes; one line per remote as each ends."""
    remotes = _configured_remotes(app, remote_names)
    store = app.store()

    def show(outcome: RemoteOutcome) -> None:
        if not as_json:
            click.echo(_outcome_line(outcome))

    run = remotes.pull if operation == "pull" else remotes.push
    with app.progress(as_json) as progress:
        report = run(
            store, tree, ref=ref_name, timeout=timeout, progress=progress, on_outcome=show,
            check=False,
        )
    if as_json:
        emit_json(report.as_dict())
    report.raise_for_failure()


@click.command("push")
@click.argument("tree")
@click.option("--to", "destination", metavar="URL|NAME", help="Copy to this one store only.")
@click.option(
    "--ref", "ref_name", metavar="NAME", help="Ref to set there (default: TREE if a ref)."
)
@_remote_option
@_timeout_option
@json_option
@pass_app
def push_command(
    app: App,
    tree: str,
    destination: str | None,
    ref_name: str | None,
    remote_names: tuple[str, ...],
    timeout: float | None,
    as_json: bool,
) -> None:
    """Copy a tree from this store to other stores.

    Copies only the blobs a destination lacks, then sets the ref there last. Without --to,
    every configured remote with push = true gets TREE; each is reported on its own line, and
    the exit status is 0 only when every one of them got it or already had it.
    """
    if destination is None:
        _through_remotes(app, "push", tree, ref_name, remote_names, timeout, as_json)
        return
    _single_store_only("--to", remote_names, timeout)
    source = app.store(create=False)
    dest = app.open(destination)
    with app.progress(as_json) as progress:
        result = source.push(dest, tree, ref=ref_name, progress=progress)
    _report_transfer(result, "pushed", source, dest, as_json)


@click.command("pull")
@click.argument("tree")
@click.option("--from", "origin", metavar="URL|NAME", help="Copy from this one store only.")
@click.option("--ref", "ref_name", metavar="NAME", help="Ref to set here (default: TREE if a ref).")
@_remote_option
@_timeout_option
@json_option
@pass_app
def pull_command(
    app: App,
    tree: str,
    origin: str | None,
    ref_name: str | None,
    remote_names: tuple[str, ...],
    timeout: float | None,
    as_json: bool,
) -> None:
    """Copy a tree from other stores into this one.

    TREE is a digest or a ref of the other store. Copies only the blobs this store lacks, then
    sets the ref last. Without --from, the configured remotes are tried in order and the first
    that has TREE is pulled from; the exit status is 0 when one of them delivered it.
    """
    if origin is None:
        _through_remotes(app, "pull", tree, ref_name, remote_names, timeout, as_json)
        return
    _single_store_only("--from", remote_names, timeout)
    dest = app.store()
    source = app.open(origin, create=False)
    with app.progress(as_json) as progress:
        result = dest.pull(source, tree, ref=ref_name, progress=progress)
    _report_transfer(result, "pulled", source, dest, as_json)
