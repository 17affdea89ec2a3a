"""SIGKILL at random moments of import, push and prune in fresh interpreters, and of a push to
a ``casframe serve`` over ``file://`` — the client killed, or the server.

``tests/test_crash.py`` kills forked children working on ``file://`` stores; here every child is
a new interpreter (``kill_helpers.Killer(spawn=True)``), as a user's command is, and the pushes
go through gRPC to a real server process on a free loopback port. After each kill fsck must
find the store sound — no corrupt or partial object under any digest, no ref to an incomplete
tree — wherever the kill landed; then the interrupted command, run again, must give what an
uninterrupted run gives. A client whose server is killed under it must end with an error (exit
status 1: a casframe error), not hang. Leftover temp files are allowed until prune, which must
remove them all with no grace period.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from kill_helpers import Child, Killer, assert_sound, make_source

from casframe import open_store
from casframe.maintenance import prune
from casframe.tree import missing_in_tree

SEED = 20261206
ROUNDS = 4  # each round kills six times: ~25 kills, a minute on a busy 2-core machine
# First guesses of the run times (seconds after "ready"); the killer then follows what it sees.
FIRST_ESTIMATE = {"import": 0.3, "transfer": 0.3, "push-grpc": 0.5, "prune": 0.1}


def _serve(killer: Killer, url: str, *, without_tmpfile: bool = False) -> tuple[Child, str]:
    server = killer.start("serve", url, spawn=True, without_tmpfile=without_tmpfile)
    return server, f"grpc://127.0.0.1:{server.detail}"


def _push(killer: Killer, source_url: str, server_url: str, ref: str) -> None:
    """The push run again, to its end."""
    pusher = killer.start("transfer", source_url, server_url, ref, spawn=True)
    assert pusher.wait() == 0
    pusher.close()


def _tmp_entries(root: Path) -> int:
    return len(os.listdir(root / "tmp"))


@pytest.mark.timeout(900)
def test_sigkill_during_import_push_serve_and_prune(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    killer = Killer(rng, FIRST_ESTIMATE)
    roots = {name: tmp_path / name for name in ("a", "b", "c")}
    urls = {name: f"file://{root}" for name, root in roots.items()}
    a, b, c = (open_store(urls[name]) for name in ("a", "b", "c"))
    reference = open_store("memory://")  # where an uninterrupted import says what is right
    server, server_url = _serve(killer, urls["c"])
    temp_left = 0
    pushes_cut_by_server_kill = 0
    try:
        for round_no in range(ROUNDS):
            named_temp = round_no % 2 == 1  # as on a file system without O_TMPFILE
            source = make_source(tmp_path / f"src{round_no}", rng, round_no)
            ref = f"build/{round_no}"
            expected = reference.import_directory(source)

            # import into a
            killer.run("import", urls["a"], source, ref, spawn=True, without_tmpfile=named_temp)
            temp_left += _tmp_entries(roots["a"])
            assert_sound(a)
            a.set_ref(ref, a.import_directory(source))  # the same command, run again
            assert a.get_ref(ref) == expected and not missing_in_tree(a, expected)

            # push a → b (file://)
            killer.run(
                "transfer", urls["a"], urls["b"], ref, spawn=True, without_tmpfile=named_temp
            )
            temp_left += _tmp_entries(roots["b"])
            assert_sound(b)
            assert a.push(b, ref).root == expected
            assert not missing_in_tree(b, expected)

            # push a → casframe serve over c, the client killed
            pusher = killer.start("transfer", urls["a"], server_url, ref, spawn=True)
            killer.kill_later(pusher, "push-grpc")
            assert_sound(c)
            _push(killer, urls["a"], server_url, ref)
            assert c.get_ref(ref) == expected and not missing_in_tree(c, expected)

            # push a → casframe serve over a new store d, the server killed under it
            d_root = tmp_path / f"d{round_no}"
            d = open_store(f"file://{d_root}")
            doomed, doomed_url = _serve(killer, f"file://{d_root}", without_tmpfile=named_temp)
            pusher = killer.start("transfer", urls["a"], doomed_url, ref, spawn=True)
            killer.random_delay("push-grpc")
            killer.kills += doomed.kill()
            status = pusher.wait()
            assert status in (0, 1), f"the push ended with status {status}"  # 1: a casframe error
            if status:
                pushes_cut_by_server_kill += 1
            else:  # finished first: aim at its real run time from now on
                done = [m for m in pusher.messages() if m.startswith("done")]
                killer.estimate["push-grpc"] = float(done[0].split()[1])
            pusher.close()
            doomed.close()
            temp_left += _tmp_entries(d_root)
            assert_sound(d)
            doomed, doomed_url = _serve(killer, f"file://{d_root}")  # restarted
            _push(killer, urls["a"], doomed_url, ref)
            doomed.close()
            assert d.get_ref(ref) == expected and not missing_in_tree(d, expected)
            prune(d, grace_period=0)
            assert _tmp_entries(d_root) == 0
            d.close()

            # prune c, the server's store, while it serves: drop the previous round's tree
            for old in c.list_refs("build/"):
                if old.name != ref:
                    c.delete_ref(old.name)
            killer.run("prune", urls["c"], spawn=True)
            assert_sound(c)
            report = prune(c, grace_period=0)
            assert not report.problems
            assert _tmp_entries(roots["c"]) == 0  # no grace: every temp file is stale
            assert {r.name for r in c.list_refs()} == {ref}
            assert not missing_in_tree(c, expected)
            for store, root in ((a, roots["a"]), (b, roots["b"])):
                prune(store, grace_period=0)
                assert _tmp_entries(root) == 0
    finally:
        server.close()

    assert killer.interrupted > 0, "no kill landed before its command had finished"
    assert pushes_cut_by_server_kill > 0, "no server was killed during a push"
    assert temp_left > 0  # killed writers did leave temp files for prune to clean
    for store in (a, b, c):
        assert_sound(store)
