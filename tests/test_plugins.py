"""Plugin loading and the scheme registry, with throwaway plugins and fake distributions.

Every test that changes plugins goes through the ``plugins`` fixture, which clears the
environment switches and rebuilds the plugin manager before and after the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import pytest

import casframe
from casframe import (
    ConfigError,
    DuplicateSchemeError,
    MissingDependencyError,
    Store,
    UnknownSchemeError,
    hookimpl,
    list_plugins,
    open_store,
    registered_plugin,
)
from casframe.config import load_config
from casframe.plugins import open_configured_store, reset_plugin_manager

FAKE_MODULE = "casframe_fakeplug_module"
FAKE_PLUGIN_BODY = """
from casframe import hookimpl, open_store


def open_fake(url):
    store = open_store("memory://")
    store.url = url.url
    return store


@hookimpl
def casframe_register_backends(registry):
    registry.add("fake", open_fake, description="a fake plugin for tests")
"""


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Clean switches and a fresh plugin manager, rebuilt again after the test."""
    monkeypatch.delenv("CASFRAME_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("CASFRAME_BLOCK_PLUGINS", raising=False)
    reset_plugin_manager()
    try:
        yield monkeypatch
    finally:
        reset_plugin_manager()


@pytest.fixture
def fake_distribution(
    plugins: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Callable[..., None]]:
    """Install a fake distribution ``fakeplug`` 1.2.3 whose entry point is in group casframe.

    Done the way pluggy's own tests do it: a ``*.dist-info`` directory on ``sys.path``.
    """
    site = tmp_path / "site"

    def install(body: str = FAKE_PLUGIN_BODY, name: str = "fakeplug") -> None:
        info = site / "fakeplug-1.2.3.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: fakeplug\nVersion: 1.2.3\n"
        )
        (info / "entry_points.txt").write_text(f"[casframe]\n{name} = {FAKE_MODULE}\n")
        (site / f"{FAKE_MODULE}.py").write_text(textwrap.dedent(body))
        plugins.syspath_prepend(str(site))

    try:
        yield install
    finally:
        sys.modules.pop(FAKE_MODULE, None)


def _plugin(name: str) -> casframe.plugins.PluginInfo:
    by_name = {info.name: info for info in list_plugins()}
    assert name in by_name, f"plugin {name!r} not listed: {sorted(by_name)}"
    return by_name[name]


# -- listing ------------------------------------------------------------------------------------


def test_builtin_backends_are_plugins_of_the_casframe_distribution(plugins) -> None:
    local, memory = _plugin("local"), _plugin("memory")
    assert (local.distribution, local.version, local.schemes) == (
        "casframe", casframe.__version__, ("file",),
    )
    assert (memory.distribution, memory.version, memory.schemes) == (
        "casframe", casframe.__version__, ("memory",),
    )
    assert not local.blocked and not memory.blocked


def test_third_party_entry_point_is_loaded_and_listed(fake_distribution) -> None:
    fake_distribution()
    fake = _plugin("fakeplug")
    assert (fake.distribution, fake.version, fake.schemes, fake.blocked) == (
        "fakeplug", "1.2.3", ("fake",), False,
    )
    store = open_store("fake://anything")
    assert isinstance(store, Store) and store.url == "fake://anything"
    assert store.put_bytes(b"x") in {d for d, _ in store.read_many([store.put_bytes(b"x")])}


def test_plugins_are_not_loaded_at_import_time() -> None:
    code = (
        "import sys, casframe; "
        "loaded = [m for m in ('casframe_local', 'casframe_memory') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_pytest_plugin_is_cheap_to_import() -> None:
    code = (
        "import sys, casframe.testing.plugin; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('google', 'grpc', 'boto3', 'botocore', 'moto', 'click', 'tqdm', "
        "'casframe_local', 'casframe_memory') or m.startswith('casframe._protos')); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_builtin_plugins_import_their_stores_only_when_a_store_is_opened(
    tmp_path: Path,
) -> None:
    code = (
        "import sys, casframe, casframe.plugins; "
        "casframe.plugins.get_plugin_manager(); "
        "assert {'casframe_local', 'casframe_memory'} <= set(sys.modules); "
        "stores = {'casframe.store', 'casframe_local.store', 'casframe_memory.store'}; "
        "assert not stores & set(sys.modules), sorted(stores & set(sys.modules)); "
        f"casframe.open_store('file://{tmp_path}/store').close(); "
        "assert 'casframe_local.store' in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- switches -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_disable_autoload_keeps_only_casframes_own_plugins(
    fake_distribution, plugins, value: str
) -> None:
    fake_distribution()
    plugins.setenv("CASFRAME_DISABLE_PLUGIN_AUTOLOAD", value)
    reset_plugin_manager()
    names = {info.name for info in list_plugins()}
    assert {"local", "memory"} <= names
    assert "fakeplug" not in names
    assert FAKE_MODULE not in sys.modules, "a disabled plugin is not even imported"
    with pytest.raises(UnknownSchemeError):
        open_store("fake://x")
    assert isinstance(open_store("memory://"), Store)


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_autoload_stays_on_for_false_values(fake_distribution, plugins, value: str) -> None:
    fake_distribution()
    plugins.setenv("CASFRAME_DISABLE_PLUGIN_AUTOLOAD", value)
    reset_plugin_manager()
    assert _plugin("fakeplug").schemes == ("fake",)


def test_block_plugins_by_name(fake_distribution, plugins) -> None:
    fake_distribution()
    plugins.setenv("CASFRAME_BLOCK_PLUGINS", "fakeplug")
    reset_plugin_manager()
    fake = _plugin("fakeplug")
    assert fake.blocked and fake.schemes == ()
    assert (fake.distribution, fake.version) == ("fakeplug", "1.2.3")
    assert FAKE_MODULE not in sys.modules, "a blocked plugin is not even imported"
    with pytest.raises(UnknownSchemeError):
        open_store("fake://x")
    assert not _plugin("memory").blocked


def test_block_several_plugins_including_a_builtin(fake_distribution, plugins) -> None:
    fake_distribution()
    plugins.setenv("CASFRAME_BLOCK_PLUGINS", " memory , fakeplug ")
    reset_plugin_manager()
    assert _plugin("memory").blocked and _plugin("fakeplug").blocked
    assert not _plugin("local").blocked
    with pytest.raises(UnknownSchemeError, match="file://") as caught:
        open_store("memory://")
    assert "memory://" not in str(caught.value).partition("registered schemes:")[2]


# -- the registry -------------------------------------------------------------------------------


class _Throwaway:
    """A plugin object registering whatever schemes a test asks for."""

    def __init__(self, *registrations: tuple[str, object, str | None]) -> None:
        self.registrations = registrations
        self.install: str | None = None

    @hookimpl
    def casframe_register_backends(self, registry) -> None:  # type: ignore[no-untyped-def]
        for scheme, factory, extra in self.registrations:
            registry.add(scheme, factory, extra=extra, install=self.install)


def test_duplicate_scheme_names_both_plugins(plugins) -> None:
    with registered_plugin(_Throwaway(("memory", lambda url: None, None)), name="throwaway"):
        with pytest.raises(DuplicateSchemeError) as caught:
            open_store("memory://")
        message = str(caught.value)
        assert "memory://" in message
        assert "'memory'" in message and "'throwaway'" in message
        with pytest.raises(DuplicateSchemeError):
            list_plugins()
    assert isinstance(open_store("memory://"), Store), "unregistered after the block"


def test_duplicate_scheme_names_the_builtin_as_the_first_owner(plugins) -> None:
    """Built-ins register first, so the plugin arriving later is named as the duplicate."""
    with registered_plugin(_Throwaway(("memory", lambda url: None, None)), name="throwaway"):
        with pytest.raises(DuplicateSchemeError) as caught:
            open_store("memory://")
    message = str(caught.value)
    assert message.index("'memory'") < message.index("'throwaway'"), message


def test_duplicate_scheme_from_a_third_party_distribution(fake_distribution) -> None:
    fake_distribution(FAKE_PLUGIN_BODY.replace('registry.add("fake"', 'registry.add("file"'))
    with pytest.raises(DuplicateSchemeError) as caught:
        open_store("memory://")
    assert "'local'" in str(caught.value) and "'fakeplug'" in str(caught.value)


class _Counting:
    """A plugin counting how often its ``casframe_register_backends`` runs."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self.calls = 0

    @hookimpl
    def casframe_register_backends(self, registry) -> None:  # type: ignore[no-untyped-def]
        self.calls += 1
        registry.add(self.scheme, "casframe_memory.store:open_memory_store")


def test_the_registry_is_built_once_and_again_after_a_plugin_arrives(
    plugins, tmp_path: Path
) -> None:
    counting = _Counting("counted")
    cache = f"cache://?local=file://{tmp_path / 'local'}&remote=file://{tmp_path / 'remote'}"
    with registered_plugin(counting, name="counting"):
        # A cache:// store opens two more stores: all three are resolved with one registry.
        with open_store(cache) as store:
            store.put_bytes(b"through the cache")
        assert counting.calls == 1
        open_store("memory://").close()
        list_plugins()
        assert counting.calls == 1, "the registry is kept between uses"

        with registered_plugin(_Throwaway(("late", "casframe_memory.store:open_memory_store",
                                           None)), name="late"):
            assert open_store("late://").url == "late://", "a plugin registered later is seen"
            assert counting.calls == 2
        with pytest.raises(UnknownSchemeError, match="'late'"):
            open_store("late://")
        assert counting.calls == 3, "and its schemes go when it is unregistered"


class _Keeping:
    """A plugin that keeps the registry its hook was given and adds to it later."""

    registry: casframe.BackendRegistry | None = None

    @hookimpl
    def casframe_register_backends(self, registry) -> None:  # type: ignore[no-untyped-def]
        self.registry = registry
        registry.add("kept", "casframe_memory.store:open_memory_store")


def test_each_scheme_is_owned_by_the_plugin_that_added_it(plugins) -> None:
    keeping = _Keeping()
    other = _Throwaway(("other", "casframe_memory.store:open_memory_store", None),
                       ("other2", "casframe_memory.store:open_memory_store", None))
    with registered_plugin(keeping, name="keeping"), registered_plugin(other, name="other"):
        assert _plugin("keeping").schemes == ("kept",)
        assert _plugin("other").schemes == ("other", "other2")
        assert _plugin("memory").schemes == ("memory",)
        # Adding after the hook returned is refused, not attributed to whoever runs next.
        assert keeping.registry is not None
        with pytest.raises(ConfigError) as caught:
            keeping.registry.add("sneaky", "casframe_memory.store:open_memory_store")
        assert str(caught.value) == (
            "plugin 'keeping' cannot add scheme 'sneaky': the backend registry is complete; "
            "add schemes from the casframe_register_backends hook"
        )
        with pytest.raises(UnknownSchemeError):
            open_store("sneaky://")


def _open_mirror(url: casframe.StoreURL, opener: casframe.StoreOpener) -> Store:
    """``mirror://?of=STORE``: the store ``of`` names, opened through the opener."""
    return opener.open(url.options["of"])


def test_a_factory_taking_an_opener_opens_stores_of_the_callers_configuration(
    plugins, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "ci.toml"
    config.write_text(
        f'[stores.shared]\nurl = "file://{tmp_path / "shared"}"\n'
        '[stores.loop]\nurl = "mirror://?of=loop"\n'
    )
    monkeypatch.setenv("CASFRAME_CONFIG", str(tmp_path / "absent.toml"))  # not the user's file
    with registered_plugin(_Throwaway(("mirror", _open_mirror, None)), name="mirror"):
        opener = casframe.StoreOpener(load_config(config))
        with opener.open_url("mirror://?of=shared") as store:
            assert store.url == f"file://{tmp_path / 'shared'}"
            digest = store.put_bytes(b"shared")
        with open_configured_store("shared", config=load_config(config)) as shared:
            assert shared.read_bytes(digest) == b"shared"
        with pytest.raises(ConfigError) as caught:
            open_configured_store("loop", config=load_config(config))
        assert str(caught.value) == (
            "store 'loop' leads back to itself through the stores it opens: loop -> loop"
        )
        # Without a configuration, names resolve in the user's file, where 'shared' is unknown.
        with pytest.raises(ConfigError, match="unknown store 'shared'"):
            open_store("mirror://?of=shared")


def test_lazy_factory_whose_own_module_is_missing_names_plugin_and_module(plugins) -> None:
    lazy = ("fakes3", "casframe_tests_no_such_module.backend:open_store", "s3")
    with registered_plugin(_Throwaway(lazy), name="lazy"):
        assert _plugin("lazy").schemes == ("fakes3",), "registering does not import"
        with pytest.raises(ConfigError) as caught:
            open_store("fakes3://bucket/prefix")
    message = str(caught.value)
    assert "'lazy'" in message and "fakes3://" in message
    assert "casframe_tests_no_such_module" in message


@pytest.mark.parametrize(
    ("extra", "install", "hint"),
    [
        ("s3", None, "pip install 'casframe[s3]'"),  # an extra of casframe itself
        (None, "casframe-fakes3[sdk]", "pip install 'casframe-fakes3[sdk]'"),  # a third party's
    ],
)
def test_lazy_factory_whose_dependency_is_missing_names_what_to_install(
    plugins, tmp_path: Path, extra: str | None, install: str | None, hint: str
) -> None:
    (tmp_path / "casframe_tests_lazy_backend.py").write_text(
        "import casframe_tests_missing_sdk  # the optional dependency, not installed\n"
    )
    plugins.syspath_prepend(str(tmp_path))
    plugin = _Throwaway(("fakes3", "casframe_tests_lazy_backend:open_store", extra))
    plugin.install = install
    try:
        with registered_plugin(plugin, name="lazy"):
            assert _plugin("lazy").schemes == ("fakes3",), "registering does not import"
            assert "casframe_tests_lazy_backend" not in sys.modules
            with pytest.raises(MissingDependencyError) as caught:
                open_store("fakes3://bucket/prefix")
    finally:
        sys.modules.pop("casframe_tests_lazy_backend", None)
    message = str(caught.value)
    assert hint in message
    assert "casframe_tests_missing_sdk" in message
    assert "fakes3://" in message
    assert isinstance(caught.value, ImportError)
    assert (caught.value.module, caught.value.extra) == ("casframe_tests_missing_sdk", extra)


def test_lazy_factory_is_imported_when_used(plugins) -> None:
    lazy = ("lazymem", "casframe_memory.store:open_memory_store", None)
    with registered_plugin(_Throwaway(lazy), name="lazy"):
        store = open_store("lazymem://")
    assert store.url == "lazymem://"
    assert store.read_bytes(store.put_bytes(b"lazy")) == b"lazy"


def test_lazy_factory_must_name_module_and_attribute(plugins) -> None:
    with registered_plugin(_Throwaway(("bad", "no_colon_here", None)), name="bad"):
        with pytest.raises(ConfigError, match="module:attribute"):
            open_store("memory://")


def test_unknown_scheme_lists_the_registered_ones(plugins) -> None:
    with pytest.raises(UnknownSchemeError) as caught:
        open_store("nosuch://bucket")
    message = str(caught.value)
    assert "'nosuch'" in message
    assert "file://" in message and "memory://" in message


@pytest.mark.parametrize("url", ["not a url", "/just/a/path", "://no-scheme"])
def test_malformed_url_is_a_config_error(plugins, url: str) -> None:
    with pytest.raises(ConfigError):
        open_store(url)


def test_registered_plugin_is_removed_afterwards(plugins) -> None:
    extra = ("extra", "casframe_memory.store:open_memory_store", None)
    with registered_plugin(_Throwaway(extra), name="extra") as name:
        assert name == "extra"
        assert _plugin("extra").distribution == "(registered in code)"
        open_store("extra://")
    assert "extra" not in {info.name for info in list_plugins()}
    with pytest.raises(UnknownSchemeError):
        open_store("extra://")


# -- a real third-party distribution: examples/casframe-sqlite, installed by `make test` -------

SQLITE_DIST = "casframe-sqlite"
SQLITE_PLUGIN = "sqlite"  # its entry-point name: what `casframe plugins` shows and blocks


def _casframe_cli(*args: str, **switches: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``casframe`` command with only the given CASFRAME_* switches set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASFRAME_")}
    env.update(switches)
    return subprocess.run(
        [str(Path(sys.executable).parent / "casframe"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _cli_plugins(**switches: str) -> tuple[dict[str, list[str]], dict[str, dict[str, object]]]:
    """``casframe plugins`` as table rows and as ``--json`` records, both by plugin name."""
    text = _casframe_cli("plugins", **switches)
    as_json = _casframe_cli("plugins", "--json", **switches)
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
    rows = {line.split()[0]: line.split() for line in text.stdout.splitlines()[1:]}
    records = {r["name"]: r for r in json.loads(as_json.stdout)}
    return rows, records


def test_cli_lists_an_installed_third_party_plugin_with_version_and_scheme(plugins) -> None:
    version = metadata.version(SQLITE_DIST)
    rows, records = _cli_plugins()
    assert rows[SQLITE_PLUGIN] == [SQLITE_PLUGIN, SQLITE_DIST, version, "sqlite://"]
    assert records[SQLITE_PLUGIN] == {
        "name": SQLITE_PLUGIN,
        "distribution": SQLITE_DIST,
        "version": version,
        "schemes": ["sqlite"],
        "blocked": False,
    }
    assert version == "0.1.0"
    info = _plugin(SQLITE_PLUGIN)
    assert (info.distribution, info.version, info.schemes, info.blocked) == (
        SQLITE_DIST, version, ("sqlite",), False,
    )


def test_blocking_an_installed_third_party_plugin_by_name(plugins, tmp_path: Path) -> None:
    rows, records = _cli_plugins(CASFRAME_BLOCK_PLUGINS=SQLITE_PLUGIN)
    assert rows[SQLITE_PLUGIN][2:] == [metadata.version(SQLITE_DIST), "-", "(blocked)"]
    assert records[SQLITE_PLUGIN]["blocked"] is True
    assert records[SQLITE_PLUGIN]["schemes"] == []
    assert not records["local"]["blocked"]

    database = tmp_path / "cas.db"
    refused = _casframe_cli(
        "--store", f"sqlite://{database}", "ref", "list", CASFRAME_BLOCK_PLUGINS=SQLITE_PLUGIN
    )
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert "unknown store scheme 'sqlite'; registered schemes: cache://, file://" in refused.stderr
    assert "sqlite://" not in refused.stderr.partition("registered schemes:")[2]

    plugins.setenv("CASFRAME_BLOCK_PLUGINS", SQLITE_PLUGIN)
    reset_plugin_manager()
    assert _plugin(SQLITE_PLUGIN).blocked
    with pytest.raises(UnknownSchemeError, match="unknown store scheme 'sqlite'") as caught:
        open_store(f"sqlite://{database}")
    registered = str(caught.value).partition("registered schemes:")[2]
    assert "file://" in registered and "memory://" in registered
    assert "sqlite://" not in registered
    assert not database.exists(), "nothing was created"

    code = (
        "import sys, casframe; casframe.list_plugins(); "
        "loaded = [m for m in sys.modules if m.startswith('casframe_sqlite')]; "
        "assert not loaded, loaded"
    )
    env = {**os.environ, "CASFRAME_BLOCK_PLUGINS": SQLITE_PLUGIN}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_disabling_autoload_hides_an_installed_third_party_plugin(
    plugins, tmp_path: Path
) -> None:
    rows, records = _cli_plugins(CASFRAME_DISABLE_PLUGIN_AUTOLOAD="1")
    assert SQLITE_PLUGIN not in rows and SQLITE_PLUGIN not in records
    assert {"local", "memory"} <= records.keys()

    plugins.setenv("CASFRAME_DISABLE_PLUGIN_AUTOLOAD", "1")
    reset_plugin_manager()
    assert SQLITE_PLUGIN not in {info.name for info in list_plugins()}
    with pytest.raises(UnknownSchemeError, match="registered schemes: cache://, file://"):
        open_store(f"sqlite://{tmp_path / 'cas.db'}")
    assert not (tmp_path / "cas.db").exists()
