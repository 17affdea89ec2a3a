"""The documentation is complete and true: meta-tests over docs/ and README.md.

- every hook in ``casframe.hookspecs`` has a section in docs/hooks.md and a test under tests/;
- every command and subcommand of the real ``casframe`` click group has a section in
  docs/cli.md that names each of its options and arguments;
- README.md links every page of docs/, and links between pages point at existing headings;
- the code of docs/writing-a-backend.md (a whole backend and its tests) and the examples of
  docs/testing.md run, through pytest, as a plugin author would run them;
- the console blocks marked ``<!-- test: run -->`` run in a sandbox (after the set-up lines
  the marker may hold) and print what they show; every console or shell block of README.md,
  docs/ and the examples' READMEs that shows a ``casframe`` command is marked so, or says why it
  cannot run with ``<!-- test: not run: REASON -->``;
- python blocks showing a result (``x = call()  # -> repr``) run, and return what they show.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.metadata
import os
import re
import select
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from casframe import hookspecs, spi
from casframe.cli import make_cli
from casframe.cli.group import BUILTIN_COMMANDS

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TESTS = ROOT / "tests"


# -- reading Markdown ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """A heading and everything below it up to the next heading of the same or a higher level."""

    level: int
    title: str
    body: str


def _lines_outside_code(text: str) -> Iterator[tuple[int, str]]:
    fenced = False
    for number, line in enumerate(text.splitlines()):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def sections(path: Path) -> list[Section]:
    """Every section of a Markdown file (headings inside code blocks are not headings)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    headings = []
    for number, line in _lines_outside_code("\n".join(lines)):
        match = re.match(r"(#{1,6}) (.+)", line)
        if match:
            headings.append((number, len(match.group(1)), match.group(2).strip()))
    found = []
    for index, (number, level, title) in enumerate(headings):
        end = next(
            (n for n, lv, _ in headings[index + 1 :] if lv <= level), len(lines)
        )
        found.append(Section(level, title, "\n".join(lines[number + 1 : end])))
    return found


def command_title(title: str) -> str:
    """``ref — names for trees`` → ``ref``; backticks removed."""
    return title.replace("`", "").split(" — ")[0].strip()


def slug(title: str) -> str:
    """The anchor GitHub makes of a heading."""
    text = re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for section in sections(path):
        base = slug(section.title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def code_files(path: Path) -> dict[str, str]:
    """The ``python`` blocks marked ``<!-- file: NAME -->``, concatenated per NAME."""
    text = path.read_text(encoding="utf-8")
    files: dict[str, list[str]] = {}
    for match in re.finditer(r"<!-- file: (\S+) -->\n```python\n(.*?)\n```", text, re.S):
        files.setdefault(match.group(1), []).append(match.group(2))
    return {name: "\n\n\n".join(parts) + "\n" for name, parts in files.items()}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)\n```", text, re.S)


# -- hooks ---------------------------------------------------------------------------------------


def hook_names() -> list[str]:
    """Every hook specification, found by introspection (pluggy marks them ``casframe_spec``)."""
    return sorted(
        name
        for name, value in vars(hookspecs).items()
        if callable(value) and getattr(value, "casframe_spec", None) is not None
    )


def test_hookspecs_are_found() -> None:
    names = hook_names()
    assert "casframe_register_backends" in names
    assert all(name.startswith("casframe_") for name in names), names


def _hook_section(hook: str) -> Section:
    found = [s for s in sections(DOCS / "hooks.md") if command_title(s.title) == hook]
    assert found, f"docs/hooks.md has no section for the hook {hook}"
    return found[0]


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_documented(hook: str) -> None:
    section = _hook_section(hook)
    for part in ("**Purpose.**", "**Arguments.**", "**Returns.**", "**When it is called.**"):
        assert part in section.body, f"the section on {hook} in docs/hooks.md lacks {part}"
    assert hook_example(hook), f"the section on {hook} in docs/hooks.md has no example plugin"


def test_hooks_md_names_every_built_in_backend() -> None:
    """The built-in plugins docs/hooks.md lists are the casframe distribution's entry points."""
    text = (DOCS / "hooks.md").read_text(encoding="utf-8")
    found = re.search(r"casframe's own backends \(([^)]*)\)", text)
    assert found, "docs/hooks.md no longer lists casframe's own backends"
    listed = sorted(re.findall(r"`(\w+)`", found.group(1)))
    shipped = sorted(
        ep.name for ep in importlib.metadata.distribution("casframe").entry_points
        if ep.group == "casframe"
    )
    assert listed == shipped


def _contract_names() -> list[str]:
    """Every method a backend may implement or override, every capability, every limit."""
    names = [
        name
        for part in (spi.BlobStore, spi.BlobWriter, spi.RefStore)
        for name, value in vars(part).items()
        if callable(value) and not name.startswith("_")
    ]
    names += [f"{kind.__name__}.{c.name}" for kind in (spi.Capability, spi.RefCapability)
              for c in kind]
    return list(dict.fromkeys(names + [f.name for f in dataclasses.fields(spi.BlobLimits)]))


@pytest.mark.parametrize("name", _contract_names())
def test_writing_a_backend_documents_the_whole_contract(name: str) -> None:
    """Each method of the backend contract, each capability and each limit is in a table of
    docs/writing-a-backend.md (for a method: where the core calls it)."""
    rows = [
        line for line in (DOCS / "writing-a-backend.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| ") and re.search(rf"`\*?{re.escape(name)}[`(]", line)
    ]
    assert rows, f"docs/writing-a-backend.md has no table row for {name}"


def hook_example(hook: str) -> str:
    """The example plugin in the section on ``hook``: the code block implementing it."""
    blocks = [
        block for block in python_blocks(_hook_section(hook).body)
        if "@hookimpl" in block and f"def {hook}(" in block
    ]
    return blocks[0] if blocks else ""


def _hookimpls_in(path: Path) -> set[str]:
    """Names of the functions decorated with ``hookimpl`` in a Python file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for decorator in node.decorator_list:
                if ast.unparse(decorator).split(".")[-1] == "hookimpl":
                    names.add(node.name)
    return names


@functools.cache
def _hookimpls_by_test_file() -> dict[str, set[str]]:
    return {path.name: _hookimpls_in(path) for path in sorted(TESTS.glob("*.py"))}


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_has_a_test(hook: str) -> None:
    testing = [name for name, hooks in _hookimpls_by_test_file().items() if hook in hooks]
    assert testing, f"no test under tests/ implements the hook {hook} (with @hookimpl)"


# -- the command line ----------------------------------------------------------------------------


def cli_commands() -> list[tuple[str, click.Command]]:
    """``(path, command)`` for every command and subcommand of the real ``casframe`` group,
    casframe's own: those that installed plugins add are documented by their plugins."""
    found = []

    def walk(group: click.Group, prefix: str) -> None:
        context = click.Context(group)  # the group may load its commands on first use
        for name in sorted(group.list_commands(context)):
            if not prefix and name not in BUILTIN_COMMANDS:
                continue
            command = group.get_command(context, name)
            assert command is not None, name
            path = f"{prefix}{name}"
            found.append((path, command))
            if isinstance(command, click.Group):
                walk(command, f"{path} ")

    walk(make_cli(), "")
    return found


def _documents(section: Section, command: click.Command) -> list[str]:
    """The options and arguments of ``command`` that ``section`` does not mention."""
    missing = []
    for param in command.params:
        if isinstance(param, click.Option):
            if param.hidden:
                continue
            names = [*param.opts, *param.secondary_opts]
            if not any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", section.body)
                       for n in names):
                missing.append("/".join(names))
        elif param.human_readable_name not in section.body:
            missing.append(param.human_readable_name)
    return missing


def test_cli_commands_are_found() -> None:
    paths = [path for path, _ in cli_commands()]
    assert {"import", "ref", "ref set", "serve", "plugins"} <= set(paths)


def cli_doc_problems(path: str, command: click.Command) -> list[str]:
    """What docs/cli.md lacks about ``casframe PATH``: its section, or options it never names."""
    found = [s for s in sections(DOCS / "cli.md") if command_title(s.title) == path]
    if not found:
        return [f"docs/cli.md has no section (a heading '{path}') for `casframe {path}`"]
    missing = _documents(found[0], command)
    if missing:
        return [f"the section on `casframe {path}` in docs/cli.md never names {missing}"]
    return []


@pytest.mark.parametrize("path,command", cli_commands(), ids=[p for p, _ in cli_commands()])
def test_every_cli_command_is_documented(path: str, command: click.Command) -> None:
    problems = cli_doc_problems(path, command)
    assert not problems, problems


def test_global_options_are_documented() -> None:
    found = [s for s in sections(DOCS / "cli.md") if s.title == "Global options"]
    assert found, "docs/cli.md has no 'Global options' section"
    missing = _documents(found[0], make_cli())
    assert not missing, f"docs/cli.md's global options never name {missing}"


def test_an_undocumented_command_or_option_is_noticed() -> None:
    """The checks above are not vacuous."""
    new = click.Command("no-such-command", callback=lambda: None)
    assert "no section" in cli_doc_problems("no-such-command", new)[0]
    ls = dict(cli_commands())["ls"]
    extended = click.Command("ls", params=[*ls.params, click.Option(["--no-such-option"])])
    assert "--no-such-option" in cli_doc_problems("ls", extended)[0]
    assert cli_doc_problems("ls", ls) == []


# -- links ---------------------------------------------------------------------------------------


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def _links(path: Path) -> list[str]:
    text = "\n".join(line for _, line in _lines_outside_code(path.read_text(encoding="utf-8")))
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


def test_readme_links_every_doc_page() -> None:
    linked = {
        (ROOT / target.split("#")[0]).resolve()
        for target in _links(ROOT / "README.md")
        if not re.match(r"[a-z]+:", target)
    }
    unlinked = [page.name for page in doc_pages() if page.resolve() not in linked]
    assert not unlinked, f"README.md does not link docs/{unlinked}"


@pytest.mark.parametrize(
    "page", [ROOT / "README.md", *doc_pages()], ids=lambda p: str(p.relative_to(ROOT))
)
def test_links_between_pages_resolve(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):
            continue  # http://, https://, mailto:
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if linked.suffix != ".md":
            continue
        if not linked.is_file():
            broken.append(f"{target}: no such page")
        elif anchor and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page.name}: {broken}"


def test_slugs_follow_github() -> None:
    assert slug("`file://PATH`") == "filepath"
    assert slug("Walk-through: a `zdir://` backend") == "walk-through-a-zdir-backend"
    assert slug("ref — names for trees") == "ref--names-for-trees"


# -- code in the docs runs ------------------------------------------------------------------------


def test_the_walk_through_backend_passes_the_conformance_suite(
    pytester: pytest.Pytester,
) -> None:
    files = code_files(DOCS / "writing-a-backend.md")
    assert set(files) == {"casframe_zdir.py", "test_zdir.py"}, sorted(files)
    for name, code in files.items():
        pytester.path.joinpath(name).write_text(code, encoding="utf-8")
    # What installing the package would do: its entry point registers the plugin.
    pytester.makeconftest(
        """
        import pytest
        import casframe
        import casframe_zdir

        @pytest.fixture(autouse=True, scope="session")
        def _zdir_plugin():
            with casframe.registered_plugin(casframe_zdir, "zdir"):
                yield
        """
    )
    # In a process of its own, as a user runs it: in pytester's in-process mode, modules the
    # inner run imported are dropped from sys.modules afterwards, and importing casframe's
    # generated protobuf modules again in the same process crashes protobuf's upb runtime.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    outcomes = result.parseoutcomes()
    assert result.ret == 0, result.stdout.str()[-3000:]
    assert outcomes.get("passed", 0) >= 90, outcomes  # the whole suite ran, not a part of it
    assert not {"failed", "errors", "skipped", "xfailed"} & outcomes.keys(), outcomes


def test_the_examples_of_testing_md_pass(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = code_files(DOCS / "testing.md")
    assert len(files) >= 4, sorted(files)
    for name, code in files.items():
        pytester.path.joinpath(name).write_text(code, encoding="utf-8")
    expected = sum(code.count("\ndef test_") + code.startswith("def test_") for code in
                   files.values())
    # The examples run `casframe` as a user would, from the environment's scripts.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    outcomes = result.parseoutcomes()
    assert result.ret == 0, result.stdout.str()[-3000:]
    assert not {"failed", "errors", "skipped", "xfailed"} & outcomes.keys(), outcomes
    assert outcomes["passed"] >= expected, (outcomes, expected)


# -- shown commands and their output are what casframe does ------------------------------------

# A console block right after a `<!-- test: run -->` comment is run by
# test_shown_commands_print_what_is_shown: each `$ command` in a shell of its own, its stdout and
# stderr compared with the lines under it. In what is shown, `…` stands for any text (digests are
# shortened that way) and times may differ; /srv/, /tmp/, /var/cache/ and /home/me/ are folders
# of the sandbox the block runs in, whose working directory holds `build/`, the build output of
# examples/demo.py. The comment may hold `$ command` lines of its own: a set-up the reader does
# not see, run first, each of which must succeed. A console or shell block that shows a
# `casframe` command and cannot run here says why instead: `<!-- test: not run: REASON -->`.
RUNNABLE = "<!-- test: run"
NOT_RUN = re.compile(r"<!-- test: not run: (?P<reason>.{20,}) -->")
PAGES = [
    ROOT / "README.md", *sorted(DOCS.glob("*.md")),
    ROOT / "examples/ops/README.md", ROOT / "examples/casframe-sqlite/README.md",
]
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:[+-]\d\d:\d\d|Z)?")
_SANDBOXED = ("/srv/", "/tmp/", "/home/me/", "/var/cache/")
_SANDBOXED_ARGUMENT = re.compile("([ '\"=]|://)(" + "|".join(map(re.escape, _SANDBOXED)) + ")")
_SHELL_BLOCK = re.compile(r"```(console|sh|shell|bash)$")
_CASFRAME_COMMAND = re.compile(r"(?:^|[\s|;&(])(?:\S*/)?casframe(?=\s|$)")


@dataclass(frozen=True)
class Shown:
    """One `$ command` of a runnable block and the output shown under it (None: not checked)."""

    page: str
    line: int
    command: str
    output: str | None


def _page_name(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.parent != DOCS else page.name


def _marker(lines: list[str], fence: int) -> tuple[int, str]:
    """The HTML comment ending on the line before ``fence``: (its first line, its text)."""
    end = fence - 1
    if end < 0 or not lines[end].rstrip().endswith("-->"):
        return fence, ""
    start = end
    while start > 0 and "<!--" not in lines[start]:
        start -= 1
    return start, "\n".join(lines[start : end + 1])


def _set_up(comment: str, page: str, line: int) -> list[Shown]:
    return [
        Shown(page, line + offset + 1, text[2:], None)
        for offset, text in enumerate(comment.splitlines())
        if text.startswith("$ ")
    ]


def runnable_blocks() -> dict[str, list[Shown]]:
    """Every runnable console block of the pages, by ``page:line``: set-up, then what is shown."""
    blocks: dict[str, list[Shown]] = {}
    for page in PAGES:
        name = _page_name(page)
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if line != "```console":
                continue
            first, comment = _marker(lines, number)
            if not comment.startswith(RUNNABLE):
                continue
            end = lines.index("```", number + 1)
            commands: list[tuple[int, str, list[str]]] = []
            for index in range(number + 1, end):
                if lines[index].startswith("$ "):
                    commands.append((index + 1, lines[index][2:], []))
                else:
                    commands[-1][2].append(lines[index])
            blocks[f"{name}:{first + 1}"] = _set_up(comment, name, first) + [
                Shown(name, n, command, "\n".join(output)) for n, command, output in commands
            ]
    return blocks


def unmarked_command_blocks(page: Path) -> list[str]:
    """The shell blocks of ``page`` showing a `casframe` command, neither runnable nor excused."""
    found = []
    lines = page.read_text(encoding="utf-8").splitlines()
    fenced = False
    for number, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            if not fenced or not (_SHELL_BLOCK.match(line) or line.strip() == "```"):
                continue
            end = next(i for i in range(number + 1, len(lines)) if lines[i].strip() == "```")
            body = lines[number + 1 : end]
            if line != "```sh" and line != "```shell" and line != "```bash":
                # a console block, or a plain one showing commands at a prompt (not a synopsis)
                body = [text[2:] for text in body if text.startswith("$ ")]
            if not any(_CASFRAME_COMMAND.search(text.split("#")[0]) for text in body):
                continue
            _, comment = _marker(lines, number)
            runnable = comment.startswith(RUNNABLE) and line == "```console"
            if not runnable and not NOT_RUN.fullmatch(comment):
                found.append(f"{_page_name(page)}:{number + 1}")
    return found


def _pattern(shown: str) -> re.Pattern[str]:
    parts = [re.escape(part) for part in _TIME.sub("\0", shown).split("…")]
    return re.compile(".*?".join(parts).replace("\\\0", "\0").replace("\0", "<time>"), re.S)


def _sandbox(path: Path) -> dict[str, str]:
    """A working directory with build/, the sandboxed folders, and an empty default store."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import demo
    finally:
        sys.path.remove(str(ROOT / "examples"))
    work = path / "work"
    work.mkdir()
    demo.make_build_output(work / "build")
    for folder in _SANDBOXED:
        (path / folder.strip("/")).mkdir(parents=True)
    (path / "home/me/.cache/casframe/store").mkdir(parents=True)
    (path / "site").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASFRAME_")}
    env.update(
        HOME=str(path / "home/me"),
        XDG_CACHE_HOME=str(path / "home/me/.cache"),
        XDG_CONFIG_HOME=str(path / "home/me/.config"),
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        CASFRAME_STAT_CACHE="off",
        COLUMNS="100",
        DOC_FIXTURES=str(TESTS / "doc_fixtures.py"),
        PYTHONPATH=str(path / "site"),
    )
    return env


def sandboxed(text: str, path: Path) -> str:
    """``text`` with the sandboxed folders moved under ``path``."""
    return _SANDBOXED_ARGUMENT.sub(lambda m: f"{m[1]}{path}{m[2]}", text)


def _serving_line(command: str, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Start a `casframe serve` command, and what it printed once serving (or on failing)."""
    process = subprocess.Popen(
        ["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 120)  # a hang guard only
        assert ready, f"`{command}` printed nothing in 120 s"
        line = process.stdout.readline()
        if line:
            return 0, line
    finally:
        process.terminate()
        out, err = process.communicate(timeout=120)
    return process.returncode, out + err


def _run(command: str, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run one shown command: its exit status and everything it printed."""
    if command.startswith("casframe serve "):
        return _serving_line(command, cwd, env)
    result = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    return result.returncode, result.stdout + result.stderr


def run_shown(shown: list[Shown], path: Path) -> list[str]:
    """Run the commands of one block in order; the differences from what is shown."""
    env = _sandbox(path)
    problems = []
    for item in shown:
        status, printed = _run(sandboxed(item.command, path), path / "work", env)
        actual = printed.rstrip("\n")
        for folder in _SANDBOXED:
            actual = actual.replace(f"{path}{folder}", folder)
        actual = _TIME.sub("<time>", actual)
        if item.output is None:
            if status != 0:
                problems.append(f"{item.page}:{item.line}: set-up `{item.command}` failed:\n"
                                f"{actual}")
        elif not _pattern(item.output).fullmatch(actual):
            problems.append(
                f"{item.page}:{item.line}: `{item.command}` printed\n{actual}\n"
                f"instead of\n{item.output}"
            )
    return problems


# A python block after `<!-- test: run -->` runs as a script in the same sandbox; a line
# `NAME = CALL  # -> SHOWN` (or `CALL  # -> SHOWN`) checks that the repr of the value is SHOWN,
# with `…` standing for any text as above. A python block showing a result that way must run.
_RESULT = re.compile(r"^(?P<indent>\s*)(?:(?P<name>\w+) = )?(?P<call>.+?)\s*# -> (?P<shown>.+)$")
_CHECK_RESULT = """
import re as _re


def _shown(value, shown, line):
    parts = [_re.escape(part) for part in shown.split("\u2026")]
    if not _re.fullmatch(".*?".join(parts), repr(value), _re.S):
        raise SystemExit(f"line {line}: the value is {value!r}, not {shown}")
    return value

"""


@dataclass(frozen=True)
class ShownCode:
    """A python block: where its code starts, the code, and whether it is marked runnable."""

    page: str
    line: int
    code: str
    marked: bool = True


def python_examples() -> dict[str, ShownCode]:
    """Every python block marked runnable, or showing a result with `# ->`, by ``page:line``."""
    found = {}
    for page in PAGES:
        name = _page_name(page)
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if line != "```python":
                continue
            end = lines.index("```", number + 1)
            code = "\n".join(lines[number + 1 : end])
            marked = _marker(lines, number)[1] == f"{RUNNABLE} -->"
            if marked or "# -> " in code:
                found[f"{name}:{number + 1}"] = ShownCode(name, number + 2, code, marked)
    return found


def checked_script(example: ShownCode) -> str:
    """The code of ``example`` with each `# -> SHOWN` turned into a check of the value."""
    lines = []
    for offset, line in enumerate(example.code.splitlines()):
        match = _RESULT.match(line)
        if not match:
            lines.append(line)
            continue
        where = f"{example.page}:{example.line + offset}"
        check = f"_shown({{}}, {match['shown']!r}, {where!r})"
        if match["name"]:
            lines.append(f"{match['indent']}{match['name']} = {match['call']}")
            lines.append(match["indent"] + check.format(match["name"]))
        else:
            lines.append(match["indent"] + check.format(match["call"]))
    return _CHECK_RESULT + "\n".join(lines) + "\n"


def run_example(example: ShownCode, path: Path) -> str:
    """Run ``example`` in a sandbox; what went wrong, or an empty string."""
    env = _sandbox(path)
    script = path / "example.py"
    script.write_text(sandboxed(checked_script(example), path), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)], cwd=path / "work", env=env, capture_output=True,
        text=True, timeout=120,
    )
    return "" if result.returncode == 0 else result.stdout + result.stderr


def test_the_readme_shows_a_python_result() -> None:
    assert any(key.startswith("README.md:") for key in python_examples())


@pytest.mark.parametrize("block", list(python_examples()))
def test_python_examples_run_and_return_what_is_shown(block: str, tmp_path: Path) -> None:
    example = python_examples()[block]
    assert example.marked, f"{block} shows a result but is not marked `{RUNNABLE} -->`"
    problem = run_example(example, tmp_path)
    assert not problem, f"{block}:\n{problem}"


def test_a_wrong_python_result_is_noticed(tmp_path: Path) -> None:
    wrong = ShownCode(
        "README.md", 1, "import casframe\nd = casframe.Digest.of_bytes(b'x')  # -> Digest(size=2)"
    )
    assert "README.md:2: the value is Digest(hash=" in run_example(wrong, tmp_path)


def test_the_readme_and_cli_reference_have_runnable_blocks() -> None:
    pages = {key.split(":")[0] for key in runnable_blocks()}
    assert {"README.md", "cli.md"} <= pages


@pytest.mark.parametrize("block", list(runnable_blocks()))
def test_shown_commands_print_what_is_shown(block: str, tmp_path: Path) -> None:
    problems = run_shown(runnable_blocks()[block], tmp_path)
    assert not problems, "\n\n".join(problems)


def test_a_drifted_output_is_noticed(tmp_path: Path) -> None:
    """The check above is not vacuous: an output that is not what casframe prints fails."""
    drifted = [Shown("README.md", 1, "casframe import build/", "4ffacce9…/237")]
    assert "printed\n" in run_shown(drifted, tmp_path)[0]


def test_a_failing_set_up_is_noticed(tmp_path: Path) -> None:
    failing = [Shown("README.md", 1, "casframe ref get nope", None)]
    assert "set-up `casframe ref get nope` failed" in run_shown(failing, tmp_path)[0]


@pytest.mark.parametrize("page", PAGES, ids=_page_name)
def test_every_shown_casframe_command_runs(page: Path) -> None:
    """A shell block showing `casframe` is run by the test above, or says why it cannot be."""
    unmarked = unmarked_command_blocks(page)
    assert not unmarked, (
        f"these blocks show a casframe command but are not marked `{RUNNABLE} -->` "
        f"(nor `<!-- test: not run: REASON -->`): {unmarked}"
    )


def test_an_unmarked_command_block_is_noticed(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```console\n$ casframe ls\n```\n\n"
        "<!-- test: not run: it needs a real AWS account and its bucket -->\n"
        "```sh\ncasframe --store s3://b ref list\n```\n\n"
        "<!-- test: not run: too short -->\n```sh\n/opt/bin/casframe gc\n```\n\n"
        "```console\n$ ls\ncasframe: error: x\n```\n\n"
        "```\ncasframe ls TREE [PATH]\n```\n\n```\n$ casframe du\ntotal 0 objects\n```\n",
        encoding="utf-8",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys.modules[__name__], "ROOT", tmp_path)
        assert unmarked_command_blocks(page) == ["page.md:1", "page.md:11", "page.md:24"]
