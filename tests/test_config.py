"""Named stores from the TOML config file, and how the default store is chosen."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import casframe
from casframe.config import (
    Config,
    builtin_default_store_url,
    config_path,
    default_store_url,
    load_config,
)
from casframe.errors import ConfigError
from casframe.plugins import open_configured_store


@pytest.fixture(autouse=True)
def isolated_env(isolated_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """conftest's user directories inside tmp_path, without a CASFRAME_STORE: these tests
    choose the store themselves."""
    monkeypatch.delenv("CASFRAME_STORE", raising=False)
    return tmp_path


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_missing_default_file_is_an_empty_config(tmp_path: Path) -> None:
    config = load_config()
    assert config.path == str(tmp_path / "config" / "casframe" / "config.toml")
    assert not config.exists
    assert config.stores == {}
    assert config.default_store is None


def test_casframe_config_env_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "elsewhere.toml", '[stores.ci]\nurl = "memory://"\n')
    monkeypatch.setenv("CASFRAME_CONFIG", str(path))
    assert config_path() == str(path)
    assert load_config().resolve_store("ci") == ("memory://", {})


def test_user_config_dir_is_read(tmp_path: Path) -> None:
    write_config(tmp_path / "config" / "casframe" / "config.toml", '[stores.a]\nurl = "memory://"\n')
    config = load_config()
    assert config.exists
    assert set(config.stores) == {"a"}


def test_named_store_with_options(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.toml",
        """
        default_store = "ci"
        [stores.ci]
        url = "s3://bucket/prefix"
        [stores.ci.options]
        region = "eu-west-1"
        retries = 3
        anonymous = true
        """,
    )
    config = load_config(path)
    assert config.resolve_store("ci") == (
        "s3://bucket/prefix",
        {"region": "eu-west-1", "retries": 3, "anonymous": True},
    )
    assert config.resolve_store(None)[0] == "s3://bucket/prefix"
    assert default_store_url(config) == "s3://bucket/prefix"


def test_store_url_may_be_a_path_relative_to_the_config_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc" / "c.toml", '[stores.local]\nurl = "cas"\n')
    assert load_config(path).resolve_store("local") == (f"file://{tmp_path}/etc/cas", {})


def test_urls_and_paths_need_no_config(tmp_path: Path) -> None:
    config = load_config()
    assert config.resolve_store("memory://") == ("memory://", {})
    assert config.resolve_store("file:///srv/cas?fsync=1") == ("file:///srv/cas?fsync=1", {})
    assert config.resolve_store("./store") == (f"file://{tmp_path}/store", {})
    assert config.resolve_store("a/b") == (f"file://{tmp_path}/a/b", {})
    assert config.resolve_store("/abs/cas") == ("file:///abs/cas", {})
    assert config.resolve_store("~/cas") == (f"file://{tmp_path}/home/cas", {})
    (tmp_path / "existing").mkdir()
    assert config.resolve_store("existing") == (f"file://{tmp_path}/existing", {})


@pytest.mark.parametrize(
    "name", ["cas#1", "a?b", "my store%20x", "100%", os.fsdecode(b"caf\xe9 (Latin-1)")]
)
def test_a_path_with_url_characters_opens_that_very_directory(tmp_path: Path, name: str) -> None:
    url, options = load_config().resolve_store(f"./{name}")
    with casframe.open_store(url, options) as store:
        store.put_bytes(b"here")
    assert [p.name for p in tmp_path.iterdir() if p.name != "home"] == [name]


def test_a_configured_name_wins_over_a_directory_of_that_name(tmp_path: Path) -> None:
    (tmp_path / "ci").mkdir()
    path = write_config(tmp_path / "c.toml", '[stores.ci]\nurl = "memory://"\n')
    assert load_config(path).resolve_store("ci") == ("memory://", {})


def test_unknown_store_name_names_the_file_and_the_defined_stores(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.toml", '[stores.ci]\nurl = "memory://"\n[stores.prod]\nurl = "memory://"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path).resolve_store("nightly")
    message = str(info.value)
    assert "unknown store 'nightly'" in message
    assert str(path) in message
    assert "ci, prod" in message
    assert "./nightly" in message


def test_unknown_name_without_a_config_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such file.*defined: none"):
        load_config().resolve_store("ci")


def test_default_store_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builtin = f"file://{tmp_path}/cache/casframe/store"
    assert builtin_default_store_url() == builtin
    assert default_store_url(load_config()) == builtin

    path = write_config(
        tmp_path / "c.toml", 'default_store = "ci"\n[stores.ci]\nurl = "memory://"\n'
    )
    assert default_store_url(load_config(path)) == "memory://"

    monkeypatch.setenv("CASFRAME_STORE", "./from-env")
    assert default_store_url(load_config(path)) == f"file://{tmp_path}/from-env"
    monkeypatch.setenv("CASFRAME_STORE", "ci")
    assert default_store_url(load_config(path)) == "memory://"


def test_default_store_may_be_a_url_or_a_path(tmp_path: Path) -> None:
    url = write_config(tmp_path / "a.toml", 'default_store = "file:///srv/cas"\n')
    assert default_store_url(load_config(url)) == "file:///srv/cas"
    path = write_config(tmp_path / "etc" / "b.toml", 'default_store = "./cas"\n')
    assert default_store_url(load_config(path)) == f"file://{tmp_path}/etc/cas"


def test_default_store_url_reads_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "c.toml", 'default_store = "memory://"\n')
    monkeypatch.setenv("CASFRAME_CONFIG", str(path))
    assert default_store_url() == "memory://"


def test_remotes_are_not_stores(tmp_path: Path) -> None:
    """``[remotes.NAME]`` tables (tests/test_remotes.py) are read apart from the stores."""
    path = write_config(tmp_path / "c.toml", '[remotes.ci]\nurl = "memory://"\npush = true\n')
    config = load_config(path)
    assert config.stores == {}
    assert (config.remotes["ci"].url, config.remotes["ci"].push) == ("memory://", True)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[stores.ci\nurl = 1", "invalid TOML"),
        ('stores = "x"', "'stores' must be a table"),
        ("[stores.ci]\nregion = 'x'", "unknown key 'region'"),
        ("[stores.ci]\noptions = {}", "'url' must be a non-empty string"),
        ("[stores.ci]\nurl = 3", "'url' must be a non-empty string"),
        ('[stores.ci]\nurl = "memory://"\noptions = 3', "options] must be a table"),
        ('[stores.ci]\nurl = "memory://"\n[stores.ci.options]\na = [1]', "'a' must be a string"),
        ('[stores."a b"]\nurl = "memory://"', "invalid store name 'a b'"),
        ('[stores]\nci = "memory://"', "[stores.ci] must be a table"),
        ('default_store = "nightly"', "default_store 'nightly' is not a URL"),
        ("default_store = 5", "'default_store' must be a non-empty string"),
        ('store = "memory://"', "unknown setting 'store'"),
        ('remotes = "x"', "'remotes' must be a table"),
    ],
)
def test_malformed_config_names_the_file_and_the_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = write_config(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert problem in str(info.value)


def test_invalid_toml_gives_the_line(tmp_path: Path) -> None:
    path = write_config(tmp_path / "bad.toml", 'default_store = "ci"\n[stores.ci\n')
    with pytest.raises(ConfigError, match=r"line 2"):
        load_config(path)


def test_explicit_config_path_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "nope.toml")


def test_unreadable_config_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "dir.toml")


def test_open_configured_store_opens_the_default_under_the_cache_dir(tmp_path: Path) -> None:
    with open_configured_store() as store:
        digest = store.put_bytes(b"hello")
    assert (tmp_path / "cache" / "casframe" / "store" / "objects" / digest.hash[:2]).is_dir()


def test_open_configured_store_passes_options_to_the_backend(tmp_path: Path) -> None:
    seen: list[casframe.StoreURL] = []

    class Plugin:
        @casframe.hookimpl
        def casframe_register_backends(self, registry: casframe.BackendRegistry) -> None:
            def factory(url: casframe.StoreURL) -> casframe.Store:
                seen.append(url)
                return casframe.open_store("memory://")

            registry.add("cfgtest", factory)

    path = write_config(
        tmp_path / "c.toml",
        '[stores.t]\nurl = "cfgtest://host/p?b=url"\n[stores.t.options]\na = "conf"\nb = "conf"\n',
    )
    with casframe.registered_plugin(Plugin(), "config-test-backend"):
        open_configured_store("t", config=load_config(path)).close()
    assert seen[0].options == {"a": "conf", "b": "url"}


def test_config_is_a_plain_value() -> None:
    config = Config(path="/x/config.toml")
    assert config.resolve_store("memory://") == ("memory://", {})
    assert os.path.isabs(config.path)
