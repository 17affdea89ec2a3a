"""A real Prometheus server (Debian's ``prometheus``) scrapes ``casframe serve
--metrics-listen`` while Bazel builds against it, and a real Pushgateway (Debian's
``prometheus-pushgateway``) receives what ``casframe gc`` and ``casframe prune`` freed.

The PromQL queried here is the one docs/server.md gives for the hit ratios. Waits are hang
guards: Prometheus is polled until its latest sample equals what the server itself reports.
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest
from bazel_helpers import ACTIONS, build, process_summary, write_workspace
from click.testing import CliRunner
from prometheus_helpers import (
    metric_value,
    prometheus_server,
    pushgateway_server,
    query,
    scrape,
    wait_until,
)
from server_processes import serve_process

from casframe.cli import make_cli

RECIPE_README = Path(__file__).resolve().parent.parent / "examples" / "ops" / "README.md"

# The hit ratios as docs/server.md gives them.
ACTION_CACHE_HIT_RATIO = (
    'sum(rate(casframe_action_cache_lookups_total{result="hit"}[5m]))'
    " / sum(rate(casframe_action_cache_lookups_total[5m]))"
)
FIND_MISSING_HIT_RATIO = (
    'sum(rate(casframe_cas_find_missing_digests_total{result="present"}[5m]))'
    " / sum(rate(casframe_cas_find_missing_digests_total[5m]))"
)


def _over_an_hour(promql: str) -> str:
    return promql.replace("[5m]", "[1h]")


def test_the_hit_ratios_tested_here_are_the_ones_the_docs_give() -> None:
    def words(text: str) -> str:
        return " ".join(text.split())

    docs = words((RECIPE_README.parent.parent.parent / "docs" / "server.md").read_text())
    assert words(ACTION_CACHE_HIT_RATIO) in docs
    assert words(FIND_MISSING_HIT_RATIO) in docs


def _latest(prometheus: str, promql: str) -> float | None:
    result = query(prometheus, promql)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_server_through_a_bazel_build(
    prometheus: str, bazel: str, tmp_path: Path
) -> None:
    with serve_process(f"file://{tmp_path}/cache", "--metrics-listen", "127.0.0.1:0") as (
        process, port
    ):
        assert process.stdout is not None
        metrics_url = process.stdout.readline().split()[-1]
        target = metrics_url.removeprefix("http://").removesuffix("/metrics")
        with prometheus_server(prometheus, tmp_path / "prometheus", [target]) as server:
            # Scraped once before the build: every counter starts from a sample at 0.
            wait_until(lambda: _latest(server, 'up{job="casframe"} == 1'), "target up")
            wait_until(
                lambda: _latest(server, "casframe_action_cache_lookups_total"),
                "a first sample of the action cache counters",
            )
            workspace = write_workspace(tmp_path / "workspace")
            url = f"grpc://127.0.0.1:{port}"
            build(bazel, workspace, tmp_path / "out1", url)
            second = build(bazel, workspace, tmp_path / "out2", url)
            assert f"{ACTIONS} remote cache hit" in process_summary(second)

            exposition = scrape(metrics_url)
            hits = metric_value(exposition, "casframe_action_cache_lookups_total", result="hit")
            misses = metric_value(
                exposition, "casframe_action_cache_lookups_total", result="miss"
            )
            assert (hits, misses) == (ACTIONS, ACTIONS)
            uploads = metric_value(exposition, "casframe_cas_blobs_stored_total")
            assert uploads is not None and uploads >= ACTIONS  # each action's output at least
            served = metric_value(exposition, "casframe_cas_blobs_served_total")
            assert served is not None and served >= ACTIONS  # the second build's downloads

            # Prometheus holds the same figures once it has scraped after the build.
            wait_until(
                lambda: _latest(server, 'casframe_action_cache_lookups_total{result="hit"}'
                                f" == {ACTIONS}"),
                "the build's action cache hits in Prometheus",
            )
            assert _latest(server, "sum(casframe_cas_blobs_stored_total)") == uploads
            # Over an hour rather than the docs' 5 minutes: a slow machine's builds may take
            # longer than that, and the window must reach back to the first build's misses.
            ratio = _latest(server, _over_an_hour(ACTION_CACHE_HIT_RATIO))
            assert ratio == pytest.approx(0.5)
            find_ratio = _latest(server, _over_an_hour(FIND_MISSING_HIT_RATIO))
            assert find_ratio is not None and 0 <= find_ratio <= 1
            handled = query(
                server, 'grpc_server_handled_total{grpc_method="GetActionResult"}'
            )
            assert {(s["metric"]["grpc_code"], s["value"][1]) for s in handled} == {
                ("OK", str(ACTIONS)), ("NOT_FOUND", str(ACTIONS))
            }
            latency = _latest(
                server, 'sum(grpc_server_handling_seconds_count{grpc_method="GetActionResult"})'
            )
            assert latency == 2 * ACTIONS
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0


def test_gc_and_prune_push_what_they_freed_to_a_pushgateway(
    pushgateway: str, tmp_path: Path, isolated_env: None
) -> None:
    store = f"file://{tmp_path}/store"
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "a.txt").write_text("kept\n")
    (tmp_path / "loose.txt").write_text("nothing refers to me\n")
    cli = make_cli()
    runner = CliRunner()
    assert runner.invoke(cli, ["--store", store, "import", str(tmp_path / "kept"),
                               "--ref", "keep"]).exit_code == 0
    assert runner.invoke(cli, ["--store", store, "put", str(tmp_path / "loose.txt")]).exit_code == 0
    with pushgateway_server(pushgateway, tmp_path / "pushgateway") as gateway:
        pruned = runner.invoke(cli, ["--store", store, "prune", "--grace", "0",
                                     "--metrics-push", gateway])
        assert pruned.exit_code == 0, pruned.output
        gc = runner.invoke(cli, ["--store", store, "gc", "--max-size", "1G", "--grace", "0",
                                 "--metrics-push", gateway])
        assert gc.exit_code == 0, gc.output
        pushed = scrape(f"{gateway}/metrics")
    group = {"store": store}
    loose = len("nothing refers to me\n")
    assert metric_value(pushed, "casframe_prune_objects_freed", job="casframe_prune",
                        **group) == 1
    assert metric_value(pushed, "casframe_prune_freed_bytes", job="casframe_prune",
                        **group) == loose
    duration = metric_value(pushed, "casframe_prune_duration_seconds", job="casframe_prune")
    assert duration is not None and duration > 0
    assert metric_value(pushed, "casframe_gc_objects_freed", job="casframe_gc", **group) == 0
    assert metric_value(pushed, "casframe_gc_target_reached", job="casframe_gc", **group) == 1
    assert metric_value(pushed, "casframe_gc_quota_bytes", job="casframe_gc", **group) == 1 << 30
    success = metric_value(pushed, "casframe_gc_last_success_timestamp_seconds", job="casframe_gc")
    assert success is not None and success > 0


def _recipe_yaml(first_line: str) -> str:
    """The YAML block of the ops recipe's README that starts with ``first_line``."""
    blocks = re.findall(r"```yaml\n(.*?)```", RECIPE_README.read_text(), re.DOTALL)
    found = [block for block in blocks if block.startswith(first_line + "\n")]
    assert len(found) == 1, f"no single YAML block starting {first_line!r} in {RECIPE_README}"
    return found[0]


def test_the_ops_recipe_scrape_config_and_alert_rules_pass_promtool(
    promtool: str, tmp_path: Path
) -> None:
    rules = tmp_path / "casframe.yml"
    rules.write_text(_recipe_yaml("# /etc/prometheus/rules/casframe.yml"))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        _recipe_yaml("# /etc/prometheus/prometheus.yml")
        .replace("/etc/prometheus/rules/casframe.yml", str(rules))
    )
    checked = subprocess.run([promtool, "check", "config", str(config)], capture_output=True,
                             text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout + checked.stderr


def _store_with_a_loose_blob(tmp_path: Path) -> str:
    store = f"file://{tmp_path}/store"
    (tmp_path / "loose.txt").write_text("nothing refers to me\n")
    put = CliRunner().invoke(make_cli(), ["--store", store, "put", str(tmp_path / "loose.txt")])
    assert put.exit_code == 0, put.output
    return store


def test_prune_writes_its_metrics_for_the_node_exporter_textfile_collector(
    tmp_path: Path, isolated_env: None
) -> None:
    store = _store_with_a_loose_blob(tmp_path)
    textfile = tmp_path / "textfile" / "casframe_prune.prom"
    textfile.parent.mkdir()
    pruned = CliRunner().invoke(make_cli(), ["--store", store, "prune", "--grace", "0",
                                             "--metrics-textfile", str(textfile)])
    assert pruned.exit_code == 0, pruned.output
    written = textfile.read_text()
    assert metric_value(written, "casframe_prune_objects_freed") == 1
    assert metric_value(written, "casframe_prune_freed_bytes") == len("nothing refers to me\n")
    assert [p.name for p in textfile.parent.iterdir()] == [textfile.name]  # no temporary left


def test_metrics_of_a_dry_run_are_refused_and_a_failed_push_is_an_error(
    pushgateway: str, tmp_path: Path, isolated_env: None
) -> None:
    store = _store_with_a_loose_blob(tmp_path)
    cli, runner = make_cli(), CliRunner()
    dry = runner.invoke(cli, ["--store", store, "prune", "--dry-run", "--metrics-push",
                              "http://127.0.0.1:9091"])
    assert dry.exit_code == 2
    assert ("--metrics-push and --metrics-textfile report what a run freed; "
            "a --dry-run frees nothing") in dry.output
    with pushgateway_server(pushgateway, tmp_path / "pushgateway") as gateway:
        wrong = f"{gateway}/no-such-prefix"
        pushed = runner.invoke(cli, ["--store", store, "prune", "--grace", "0",
                                     "--metrics-push", wrong])
    assert pushed.exit_code == 1
    assert "freed 1 object" in pushed.stdout  # the run's own report comes first
    assert pushed.stderr == f"casframe: error: cannot push metrics to {wrong}: HTTP 404 Not Found\n"
