"""Prune racing writers, in real processes on one file:// store, without any lock.

Several writer processes import overlapping trees and set refs in a loop (deleting some refs
again, so that shared blobs keep becoming unreferenced and then reused), while another process
prunes over and over with a grace period far shorter than the run. Writers reuse blobs that
are old and unreferenced: exactly the blobs a prune is about to delete. At the end every ref
must resolve to a complete tree and fsck must be clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from casframe import open_store
from casframe.tree import missing_in_tree

RUN_SECONDS = 12.0
GRACE = 0.5
WRITERS = 3

WRITER = r"""
import json, os, random, shutil, sys, time
from casframe import BlobNotFoundError, open_store

url, wid, seconds, workdir = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
rng = random.Random(wid)
store = open_store(url)
# Every writer draws from the same pool, so trees overlap within and across writers.
# It is much larger than what the refs hold, so most of it is unreferenced at any moment.
pool = [(b"pool-%d-" % i) * (40 + i) for i in range(160)]
deadline = time.time() + seconds
imports = retries = deletes = 0
# A busy machine gets extra time (up to a minute) for the least the test counts on.
while time.time() < deadline or (imports < 10 and time.time() < deadline + 60):
    src = os.path.join(workdir, "w%d-%d" % (wid, imports))
    os.makedirs(os.path.join(src, "sub"))
    for i in rng.sample(range(len(pool)), 10):
        folder = src if i % 2 else os.path.join(src, "sub")
        with open(os.path.join(folder, "p%d" % i), "wb") as f:
            f.write(pool[i])
    if rng.random() < 0.5:  # sometimes a tree no other writer has
        with open(os.path.join(src, "own"), "wb") as f:
            f.write(b"writer %d tree %d" % (wid, imports))
    name = "w%d/%d" % (wid, rng.randrange(3))
    for attempt in range(10):
        tree = store.import_directory(src)
        try:
            store.set_ref(name, tree)  # checks the tree complete, freshening it first
            break
        except BlobNotFoundError:
            retries += 1  # pruned between import and set_ref: import again
    else:
        raise SystemExit("could not set %s after 10 attempts" % name)
    if rng.random() < 0.4:
        try:
            store.delete_ref("w%d/%d" % (wid, rng.randrange(3)))
            deletes += 1
        except KeyError:
            pass
    shutil.rmtree(src)
    imports += 1
print(json.dumps({"imports": imports, "retries": retries, "deletes": deletes}))
"""

PRUNER = r"""
import json, sys, time
from casframe import Progress, RefNotFoundError, open_store
from casframe.maintenance import prune
from casframe.tree import missing_in_tree

class SlowSweep(Progress):
    # Stretch the time between reading the refs and deleting, as a big store or a slow
    # backend would: that is when a writer setting a ref on reused old blobs gets hurt.
    def start(self, task, total=None, unit="files"):
        if task == "delete":
            time.sleep(0.1)

url, seconds, grace = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
store = open_store(url)
deadline = time.time() + seconds
runs = freed = 0
broken = []
while time.time() < deadline or (runs < 10 and time.time() < deadline + 60):
    freed += store.prune(grace_period=grace, progress=SlowSweep()).objects_freed
    runs += 1
    # Writers never delete blobs: a ref that is incomplete now was broken by a prune.
    for ref in store.list_refs():
        missing = missing_in_tree(store.verified, ref.digest)
        try:
            unchanged = store.get_ref(ref.name, touch=False) == ref.digest
        except RefNotFoundError:
            unchanged = False
        if missing and unchanged:
            broken.append([ref.name, str(ref.digest), len(missing)])
print(json.dumps({"runs": runs, "freed": freed, "broken": broken}))
"""


def _spawn(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=RUN_SECONDS + 120)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def test_prune_racing_writers_never_breaks_a_ref(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    work = tmp_path / "work"
    work.mkdir()
    open_store(url).close()  # create the layout before the processes race to

    writers = [_spawn(WRITER, url, wid, RUN_SECONDS, work) for wid in range(WRITERS)]
    pruner = _spawn(PRUNER, url, RUN_SECONDS, GRACE)
    written = [_result(w) for w in writers]
    pruned = _result(pruner)

    # The race was real: many imports, many prunes, and prunes did delete blobs.
    assert sum(w["imports"] for w in written) >= 30, written
    assert sum(w["deletes"] for w in written) >= 5, written
    assert pruned["runs"] >= 10 and pruned["freed"] > 0, pruned
    assert not pruned["broken"], pruned["broken"]  # no ref was ever seen incomplete

    with open_store(url) as store:
        refs = store.list_refs()
        assert refs
        for ref in refs:
            assert not missing_in_tree(store.verified, ref.digest), ref.name
        report = store.fsck()
        assert report.ok, report.problems
        # Once the writers are gone, pruning everything unreferenced leaves every ref whole.
        store.prune(grace_period=0)
        assert store.fsck().ok
        assert not os.listdir(tmp_path / "store" / "tmp")
