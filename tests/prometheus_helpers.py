"""Prometheus' own programs on loopback for the metrics tests: a Prometheus server scraping
given targets and a Pushgateway, each on a free port, plus the reading of an exposition.

Both are started with ``--web.listen-address=127.0.0.1:0`` and say which port they got in their
log (``msg="Listening on" address=127.0.0.1:PORT``). Waits here are hang guards only: a test
asserts values, never how soon they arrive.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "metric_value",
    "prometheus_server",
    "pushgateway_server",
    "query",
    "scrape",
    "wait_until",
]

# Hang guard for a program to start or a sample to arrive: far above what either takes.
HANG_GUARD = 120.0

_T = TypeVar("_T")
_LISTENING = re.compile(r'msg="Listening on" address=(\S+):(\d+)')


def wait_until(check: Callable[[], _T | None], what: str, timeout: float = HANG_GUARD) -> _T:
    """Poll ``check`` until it returns something other than None; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:g} s")
        time.sleep(0.2)


@contextlib.contextmanager
def _program(args: list[str], log: Path, what: str) -> Iterator[str]:
    """Run a Prometheus program; yield ``http://127.0.0.1:PORT`` once it listens."""
    with log.open("w") as output:
        process = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT)
    try:

        def port() -> int | None:
            found = _LISTENING.search(log.read_text())
            if found:
                return int(found.group(2))
            if process.poll() is not None:
                raise AssertionError(f"{what} ended: {log.read_text()}")
            return None

        yield f"http://127.0.0.1:{wait_until(port, f'{what} listening')}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=HANG_GUARD)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def prometheus_server(binary: str, folder: Path, targets: list[str]) -> Iterator[str]:
    """Prometheus scraping ``targets`` (``HOST:PORT``, path /metrics) every second as job
    ``casframe``; yields its base URL once it is ready."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: casframe\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n"
    )
    args = [
        binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
        "--web.listen-address=127.0.0.1:0",
    ]
    with _program(args, folder / "prometheus.log", "prometheus") as url:

        def ready() -> bool | None:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=10) as answer:
                    return True if answer.status == 200 else None
            except OSError:
                return None

        wait_until(ready, "prometheus ready")
        yield url


@contextlib.contextmanager
def pushgateway_server(binary: str, folder: Path) -> Iterator[str]:
    """A Pushgateway; yields its base URL."""
    folder.mkdir(parents=True, exist_ok=True)
    args = [binary, "--web.listen-address=127.0.0.1:0"]
    with _program(args, folder / "pushgateway.log", "pushgateway") as url:
        yield url


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    """The result vector of an instant PromQL query."""
    address = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(address, timeout=30) as answer:
        body = json.load(answer)
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def scrape(url: str) -> str:
    """The text exposition at ``url``."""
    with urllib.request.urlopen(url, timeout=30) as answer:
        text: str = answer.read().decode()
    return text


def metric_value(exposition: str, name: str, **labels: str) -> float | None:
    """The sum of the samples ``name`` whose labels include ``labels``, or None if none."""
    values = [
        float(sample.value)
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(values) if values else None
