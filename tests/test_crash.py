"""SIGKILL at random moments during import, transfer and prune on file:// stores.

Each round starts the command in a new (forked) process, waits until it is about to work, kills it
after a random (seeded) delay and then checks that fsck finds nothing wrong: no corrupt object,
no ref to an incomplete tree. Then it runs the interrupted command again, which must succeed
and produce the result an uninterrupted run would. Killed writers leave temp files behind;
prune removes those older than its grace period. (Uploads to ``O_TMPFILE`` files leave
nothing behind; every other round runs the killed process as if the platform lacked it.)
"""

from __future__ import annotations

import os
import random
import select
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from casframe import Digest, Store, open_store
from casframe.maintenance import fsck, prune
from casframe.tree import missing_in_tree

SEED = 20240611
ROUNDS = 13  # of each command: 39 chances to kill, ~25 s on a busy 2-core machine



def _import(ready: Callable[[], None], url: str, source: str, ref: str) -> None:
    store = open_store(url)
    ready()
    store.set_ref(ref, store.import_directory(source))


def _transfer(ready: Callable[[], None], source_url: str, dest_url: str, ref: str) -> None:
    source, dest = open_store(source_url), open_store(dest_url)
    ready()
    source.push(dest, ref)


def _prune(ready: Callable[[], None], url: str) -> None:
    store = open_store(url)
    ready()
    prune(store, grace_period=0)


COMMANDS: dict[str, Callable[..., None]] = {
    "import": _import,
    "transfer": _transfer,
    "prune": _prune,
}
# First guess of each command's run time here (seconds after "ready"); the killer then follows
# what it observes, so that most kills land in the middle of the work whatever the machine.
FIRST_ESTIMATE = {"import": 0.1, "transfer": 0.1, "prune": 0.04}
READY_TIMEOUT = 60  # seconds for a forked child to report that it started


def _make_source(root: Path, rng: random.Random, tag: int) -> Path:
    """~300 small files in a few folders and one 3 MiB file (streamed in chunks)."""
    for i in range(300):
        folder = root / f"d{i % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i}").write_bytes(rng.randbytes(rng.randint(1024, 8192)))
    (root / "large.bin").write_bytes(rng.randbytes(3 << 20) + b"%d" % tag)
    return root


class _Killer:
    """Runs a command in a forked process and SIGKILLs it after a random delay.

    Forked rather than spawned: a fresh interpreter takes up to a second to start on a busy
    machine, a fork a few milliseconds, and the kill is just as real.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.estimate = dict(FIRST_ESTIMATE)
        self.kills = 0  # the process was still running when killed
        self.interrupted = 0  # ... and had not finished its work

    def run(self, command: str, *args: object, without_tmpfile: bool = False) -> None:
        """``without_tmpfile``: run as on a file system without ``O_TMPFILE``, where uploads
        go through named temp files in ``tmp/`` that a kill leaves behind."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            status = 1
            try:
                os.close(read_end)
                if without_tmpfile and hasattr(os, "O_TMPFILE"):
                    del os.O_TMPFILE  # this process only: the local store probes for it
                started = [0.0]

                def ready() -> None:
                    started[0] = time.monotonic()
                    os.write(write_end, b"ready")

                COMMANDS[command](ready, *map(str, args))
                os.write(write_end, b"done %f" % (time.monotonic() - started[0]))
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        os.close(write_end)
        try:
            # A fork of a process with threads can hang before it gets going: fail, not hang.
            if not select.select([read_end], [], [], READY_TIMEOUT)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"{command} did not start within {READY_TIMEOUT} s")
            assert os.read(read_end, 5) == b"ready"
            time.sleep(self.rng.uniform(0, self.estimate[command]))
            exited, status = os.waitpid(pid, os.WNOHANG)
            if not exited:
                os.kill(pid, signal.SIGKILL)
                self.kills += 1
                _, status = os.waitpid(pid, 0)
            done = os.read(read_end, 64)
            if os.waitstatus_to_exitcode(status) == 0:
                # Finished before the kill: aim at its real run time from now on.
                self.estimate[command] = float(done.split()[1])
            else:
                assert os.WIFSIGNALED(status), f"{command} failed"
                if not done.startswith(b"done"):
                    self.interrupted += 1
        finally:
            os.close(read_end)


def _assert_sound(store: Store) -> None:
    report = fsck(store)
    assert report.ok, [p.to_dict() for p in report.problems]
    assert not report.incomplete_refs


def test_sigkill_during_import_transfer_and_prune(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    killer = _Killer(rng)
    a_url, b_url = f"file://{tmp_path / 'a'}", f"file://{tmp_path / 'b'}"
    a, b = open_store(a_url), open_store(b_url)
    reference = open_store("memory://")  # where an uninterrupted import says what is right
    temp_left = 0
    for round_no in range(ROUNDS):
        # import: into a, a new tree each round (sharing nothing, so there is work to kill)
        source = _make_source(tmp_path / f"src{round_no}", rng, round_no)
        ref = f"build/{round_no}"
        named_temp = round_no % 2 == 1
        killer.run("import", a_url, source, ref, without_tmpfile=named_temp)
        temp_left += len(os.listdir(tmp_path / "a" / "tmp"))
        _assert_sound(a)
        expected = reference.import_directory(source)
        a.set_ref(ref, a.import_directory(source))  # the same command, run again
        assert a.get_ref(ref) == expected and not missing_in_tree(a, expected)

        # transfer: the new tree from a to b
        killer.run("transfer", a_url, b_url, ref, without_tmpfile=named_temp)
        temp_left += len(os.listdir(tmp_path / "b" / "tmp"))
        _assert_sound(b)
        assert a.push(b, ref).root == expected
        assert b.get_ref(ref) == expected and not missing_in_tree(b, expected)

        # prune: drop the previous round's refs, leaving both stores a tree's worth of garbage
        for store in (a, b):
            for old in store.list_refs("build/"):
                if old.name != ref:
                    store.delete_ref(old.name)
        killer.run("prune", a_url)
        _assert_sound(a)
        report = prune(a, grace_period=0)
        assert report.objects_kept_young == 0 and not report.problems
        assert not os.listdir(tmp_path / "a" / "tmp")  # grace 0: every temp file is stale
        assert {r.name for r in a.list_refs()} == {ref}
        assert not missing_in_tree(a, expected)
        prune(b, grace_period=0)

    assert killer.kills >= 30, killer.kills
    assert killer.interrupted >= 20, killer.interrupted
    assert temp_left > 0  # killed writers did leave temp files for prune to clean
    _assert_sound(a)
    _assert_sound(b)


def test_prune_removes_stale_temp_files_only(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 's'}")
    tmp = tmp_path / "s" / "tmp"
    stale = [tmp / "123.456.0", tmp / "123.456.1"]
    for path in stale:
        path.write_bytes(b"x" * 100)
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    live = tmp / "789.1.0"
    live.write_bytes(b"being written")
    digest = store.put_bytes(b"an unreferenced but young blob")

    dry = prune(store, dry_run=True)  # default grace: one hour
    assert (dry.temp_files_removed, dry.temp_bytes_removed) == (2, 200)
    assert all(p.exists() for p in stale)

    report = prune(store)
    assert (report.temp_files_removed, report.temp_bytes_removed) == (2, 200)
    assert sorted(os.listdir(tmp)) == [live.name]
    assert store.contains(digest)


def test_interrupted_transfer_sets_no_ref(tmp_path: Path) -> None:
    """The deterministic core of the crash test: a half-copied tree has no ref."""
    rng = random.Random(SEED)
    a = open_store(f"file://{tmp_path / 'a'}")
    b = open_store(f"file://{tmp_path / 'b'}")
    tree = a.import_directory(_make_source(tmp_path / "src", rng, 0))
    a.set_ref("r", tree)
    a.push(b, "r")
    # Take away part of b's copy as a kill before the end would have left it, minus the ref.
    b.delete_ref("r")
    victims = sorted(d for d in b.tree_digests(tree) if d.size)[:50]
    b.blobs.delete_blobs(victims)
    _assert_sound(b)
    result = a.push(b, "r")
    assert result.blobs_sent == len(victims)
    assert b.get_ref("r") == tree and not missing_in_tree(b, tree)
    assert Digest.of_bytes(b"") not in victims
