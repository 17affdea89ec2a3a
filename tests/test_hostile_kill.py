"""SIGKILL in the middle of import, push and prune in fresh interpreters, and of a push to a
``casframe serve`` over ``file://`` — the client killed, or the server.

``tests/test_crash.py`` kills forked children working on ``file://`` stores; here every child is
a new interpreter (``spawn=True``), as a user's command is, and the pushes go through gRPC to a
real server process on a free loopback port.

Each command is killed at a step drawn from the seeded generator: the child stops itself as it
is about to commit (or delete) its N-th blob, and is killed there (``kill_helpers.Stepper``), so
every kill lands in the middle of the work whatever the machine's speed or load. Once a round,
a command is killed once more after a random delay, wherever that lands. After each kill fsck
must find the store sound — no corrupt or partial object under any digest, no ref to an
incomplete tree — and the interrupted command, run again, must give what an uninterrupted run
gives. A client whose server is killed under it must end with an error (exit status 1: a
casframe error), not hang. A killed writer without ``O_TMPFILE`` leaves its temp file behind;
prune with no grace period must remove them all.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from kill_helpers import SOURCE_BLOBS, Child, Killer, assert_sound, make_source

from casframe import Store, open_store
from casframe.tree import missing_in_tree

SEED = 20261206
ROUNDS = 4  # each round kills six times: 24 kills, 30-80 s on a busy 2-core machine
# Delays up to which the extra kills are drawn at first (seconds after "ready"); the killer then
# follows the run times it sees. Where these kills land is not asserted.
FIRST_ESTIMATE = {"import": 0.3, "transfer": 0.3, "push-grpc": 0.5, "prune": 0.1}
EXTRA_KILLS = ("import", "transfer", "push-grpc", "prune")  # one a round, in turn


def _serve(
    killer: Killer, url: str, *, without_tmpfile: bool = False, stop_at: int | None = None
) -> tuple[Child, str]:
    server = killer.start(
        "serve", url, spawn=True, without_tmpfile=without_tmpfile, stop_at=stop_at
    )
    return server, f"grpc://127.0.0.1:{server.detail}"


def _push(killer: Killer, source_url: str, server_url: str, ref: str) -> None:
    """The push run again, to its end."""
    pusher = killer.start("transfer", source_url, server_url, ref, spawn=True)
    assert pusher.wait() == 0
    pusher.close()


def _tmp_entries(root: Path) -> int:
    return len(os.listdir(root / "tmp"))


def _assert_sound_after_kill(store: Store, root: Path, named_temp: bool) -> None:
    """Sound, and a writer killed without ``O_TMPFILE`` left the temp file of the blob it was
    about to commit, for prune to remove."""
    assert_sound(store)
    if named_temp:
        assert _tmp_entries(root) > 0


def _extra_kill(killer: Killer, command: str, *args: object) -> None:
    """Kill ``command`` once more, after a random delay (anywhere, or after its end)."""
    name = "transfer" if command == "push-grpc" else command
    killer.kill_at_random(name, *args, estimate=command, spawn=True)


@pytest.mark.timeout(900)
def test_sigkill_during_import_push_serve_and_prune(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    killer = Killer(rng, FIRST_ESTIMATE)
    roots = {name: tmp_path / name for name in ("a", "b", "c")}
    urls = {name: f"file://{root}" for name, root in roots.items()}
    a, b, c = (open_store(urls[name]) for name in ("a", "b", "c"))
    reference = open_store("memory://")  # where an uninterrupted import says what is right
    # A tree the first round's prune drops: every prune has a tree's worth of blobs to delete.
    c.set_ref("build/seed", c.import_directory(make_source(tmp_path / "seed", rng, -1)))
    server, server_url = _serve(killer, urls["c"])
    cut_pushes = 0
    try:
        for round_no in range(ROUNDS):
            named_temp = round_no % 2 == 1  # as on a file system without O_TMPFILE
            extra = EXTRA_KILLS[round_no % len(EXTRA_KILLS)]
            source = make_source(tmp_path / f"src{round_no}", rng, round_no)
            ref = f"build/{round_no}"
            expected = reference.import_directory(source)

            # import into a
            killer.kill_at_step(
                "import", urls["a"], source, ref, spawn=True, without_tmpfile=named_temp
            )
            _assert_sound_after_kill(a, roots["a"], named_temp)
            if extra == "import":
                _extra_kill(killer, "import", urls["a"], source, ref)
                assert_sound(a)
            a.set_ref(ref, a.import_directory(source))  # the same command, run again
            assert a.get_ref(ref) == expected and not missing_in_tree(a.verified, expected)

            # push a → b (file://)
            args = (urls["a"], urls["b"], ref)
            killer.kill_at_step("transfer", *args, spawn=True, without_tmpfile=named_temp)
            _assert_sound_after_kill(b, roots["b"], named_temp)
            if extra == "transfer":
                _extra_kill(killer, "transfer", *args)
                assert_sound(b)
            assert a.push(b, ref).root == expected
            assert not missing_in_tree(b.verified, expected)

            # push a → casframe serve over c, the client killed
            args = (urls["a"], server_url, ref)
            killer.kill_at_step("transfer", *args, spawn=True)
            assert_sound(c)
            if extra == "push-grpc":
                _extra_kill(killer, "push-grpc", *args)
                assert_sound(c)
            _push(killer, *args)
            assert c.get_ref(ref) == expected and not missing_in_tree(c.verified, expected)

            # push a → casframe serve over a new store d, the server killed under it
            d_root = tmp_path / f"d{round_no}"
            d = open_store(f"file://{d_root}")
            doomed, doomed_url = _serve(
                killer,
                f"file://{d_root}",
                without_tmpfile=named_temp,
                stop_at=rng.randint(1, SOURCE_BLOBS),
            )
            pusher = killer.start("transfer", urls["a"], doomed_url, ref, spawn=True)
            killer.stop_and_kill(doomed, peers=[pusher])
            status = pusher.wait()
            assert status == 1, f"the push ended with status {status}"  # 1: a casframe error
            cut_pushes += 1
            pusher.close()
            doomed.close()
            _assert_sound_after_kill(d, d_root, named_temp)
            doomed, doomed_url = _serve(killer, f"file://{d_root}")  # restarted
            _push(killer, urls["a"], doomed_url, ref)
            doomed.close()
            assert d.get_ref(ref) == expected and not missing_in_tree(d.verified, expected)
            d.prune(grace_period=0)
            assert _tmp_entries(d_root) == 0
            d.close()

            # prune c, the server's store, while it serves: drop the previous round's tree
            for old in c.list_refs("build/"):
                if old.name != ref:
                    c.delete_ref(old.name)
            killer.kill_at_step("prune", urls["c"], spawn=True)
            assert_sound(c)
            if extra == "prune":
                _extra_kill(killer, "prune", urls["c"])
                assert_sound(c)
            report = c.prune(grace_period=0)
            assert not report.problems
            assert _tmp_entries(roots["c"]) == 0  # no grace: every temp file is stale
            assert {r.name for r in c.list_refs()} == {ref}
            assert not missing_in_tree(c.verified, expected)
            for store, root in ((a, roots["a"]), (b, roots["b"])):
                store.prune(grace_period=0)
                assert _tmp_entries(root) == 0
    finally:
        server.close()

    assert killer.stopped == 5 * ROUNDS  # each one killed in the middle of its work
    assert cut_pushes == ROUNDS
    for store in (a, b, c):
        assert_sound(store)
