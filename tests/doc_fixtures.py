"""What the console blocks of the docs need, made by their hidden set-up lines.

The runner of tests/test_docs.py sets ``DOC_FIXTURES`` to this file and ``PYTHONPATH`` to the
sandbox's ``site/`` folder; ``python "$DOC_FIXTURES" NAME`` then makes, in the sandbox:

- ``two-builds``: ``build/`` imported as ``myapp/build-1``, then changed as a rebuild would
  change it (README.txt says build 2, lib/extra.txt is new) and imported as ``myapp/build-2``;
- ``bomb``, ``long-names``: that hostile tree in the default store, under a ref of that name;
- ``plugin NAME``: plugin NAME installed into ``site/`` as pip would (its module and a
  ``.dist-info`` declaring the entry point): ``zdir``, the backend of
  docs/writing-a-backend.md; ``treesize``, the example of docs/hooks.md; ``myplugin``, which
  adds a command whose name casframe already uses.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_docs import DOCS, code_files, hook_example  # noqa: E402
from test_hostile_trees import DEPTH, FANOUT, fan_out, long_name_tree, one_file  # noqa: E402

import casframe  # noqa: E402

CLASHING_PLUGIN = """
import click
from casframe import hookimpl


@hookimpl
def casframe_register_commands(cli):
    cli.add_command(click.Command("import", callback=lambda: None))
"""


def install_plugin(name: str) -> None:
    """Install plugin ``name`` into ``$PYTHONPATH``, with the entry point casframe looks for."""
    if name == "zdir":
        module, distribution, version = "casframe_zdir", "casframe-zdir", "1.0.0"
        code = code_files(DOCS / "writing-a-backend.md")["casframe_zdir.py"]
    else:
        module, distribution, version = f"casframe_{name}", f"casframe-{name}", "1.0"
        code = hook_example("casframe_register_commands") if name == "treesize" else CLASHING_PLUGIN
    site = Path(os.environ["PYTHONPATH"])
    (site / f"{module}.py").write_text(code, encoding="utf-8")
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(f"[casframe]\n{name} = {module}\n", encoding="utf-8")


def two_builds(store: casframe.Store) -> None:
    """Two builds of the demo app, the second with one file changed and one added."""
    build = Path("build")
    store.set_ref("myapp/build-1", store.import_directory(build))
    (build / "README.txt").write_text("demo app, build 2\n", encoding="utf-8")
    (build / "lib" / "extra.txt").write_text("extra\n", encoding="utf-8")
    store.set_ref("myapp/build-2", store.import_directory(build))


def main(name: str) -> None:
    if name == "plugin":
        install_plugin(sys.argv[2])
        return
    with casframe.open_store(f"file://{Path.home() / '.cache/casframe/store'}") as store:
        if name == "two-builds":
            two_builds(store)
            return
        if name == "bomb":
            tree = fan_out(store, one_file(store, b"x"), FANOUT, DEPTH)
        elif name == "long-names":
            tree = long_name_tree(store)
        else:
            sys.exit(f"no fixture {name!r}")
        store.set_ref(name, tree, check_complete=False)


if __name__ == "__main__":
    main(sys.argv[1])
