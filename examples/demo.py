"""casframe in two minutes: store build outputs, name them, compare, check out and share them.

Run with ``python examples/demo.py`` (or ``make demo``). Everything happens in a temporary
directory that is removed at the end; nothing else on the machine is touched.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import casframe


def step(text: str) -> None:
    print(f"\n== {text}")


def make_build_output(root: Path) -> None:
    """A small, typical build output: files, a subdirectory, a script, a symlink."""
    (root / "bin").mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "README.txt").write_text("demo app, build 1\n")
    (root / "bin" / "app").write_text("#!/bin/sh\necho 'hello from the demo app'\n")
    (root / "bin" / "app").chmod(0o755)
    (root / "lib" / "libdemo.so.1.0").write_bytes(bytes(range(256)) * 64)
    (root / "lib" / "libdemo.so.1").symlink_to("libdemo.so.1.0")


def check(condition: bool, what: str) -> None:
    if not condition:
        sys.exit(f"demo failed: {what}")
    print(f"   ok: {what}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="casframe-demo-") as tmp:
        work = Path(tmp)
        build = work / "build"
        make_build_output(build)

        step(f"Open a local store at {work / 'store'} (file:// is the embedded default)")
        store = casframe.open_store(f"file://{work / 'store'}")
        remote = casframe.open_store(f"file://{work / 'remote'}")

        step("Import the build output and name it demo/build-1")
        build_1 = store.import_directory(build)
        store.set_ref("demo/build-1", build_1)
        print(f"   root digest: {build_1}")
        for entry in sorted(store.walk("demo/build-1"), key=lambda e: e.path.split("/")):
            detail = f" -> {entry.target}" if entry.kind == "symlink" else ""
            print(f"   {entry.kind:<9} {entry.path}{detail}")

        step("Change one file, import again as demo/build-2 (unchanged files are not rewritten)")
        (build / "README.txt").write_text("demo app, build 2\n")
        build_2 = store.import_directory(build)
        store.set_ref("demo/build-2", build_2)
        print(f"   root digest: {build_2}")

        step("What changed between the two builds?")
        changes = store.diff("demo/build-1", "demo/build-2")
        for path in changes.added:
            print(f"   A {path}")
        for path in changes.removed:
            print(f"   D {path}")
        for path in changes.modified:
            print(f"   M {path}")
        check(changes.modified == ["README.txt"] and not changes.added, "only README.txt differs")

        step("Refs, least recently used first")
        for ref in store.list_refs("demo/"):
            print(f"   {ref.name:<14} {ref.digest}")

        step("Check out demo/build-1 by hardlinks into a fresh directory")
        checkout = work / "checkout"
        store.checkout("demo/build-1", checkout, link=True)
        library = checkout / "lib" / "libdemo.so.1.0"
        check(library.stat().st_nlink > 1, "files are hardlinks to the store's read-only objects")
        check(os.access(checkout / "bin" / "app", os.X_OK), "bin/app is still executable")
        check(store.import_directory(checkout) == build_1, "the checkout re-imports to build-1")

        step("Push demo/build-1 to a second store and check it out from there")
        result = store.push(remote, "demo/build-1")
        sent = f"{result.blobs_sent} of {result.blobs_total} blobs, {result.bytes_sent} bytes"
        print(f"   sent {sent}")
        again = store.push(remote, "demo/build-1")
        check(again.already_present, "pushing again sends nothing")
        from_remote = work / "from-remote"
        remote.checkout("demo/build-1", from_remote)
        check(
            (from_remote / "README.txt").read_text() == "demo app, build 1\n",
            "the remote copy has build 1's README",
        )
        check(remote.get_ref("demo/build-1") == build_1, "the ref arrived with the tree")
        store.close()
        remote.close()

    print("\nDone; the temporary directory was removed.")


if __name__ == "__main__":
    main()
