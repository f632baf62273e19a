"""deploy/prometheus/ and deploy/grafana/ against a real Prometheus (Debian's `prometheus` package).

`promtool` checks the configs and rules. The end-to-end test starts Prometheus on 127.0.0.1
(its own temp dir, a free port, 1 s scrape and rule intervals) with deploy/prometheus/prometheus.yml's
scrape jobs pointed at live targets: a `gradcomp serve` coordinator with one `gradcomp client`
(examples/fed-digits-dp.yaml), a `gradcomp train` run (examples/digits-dp.yaml: DP-SGD, so epsilon
is exported) on a local Ray whose metrics agent exports the node metrics. After two scrapes of
every target it queries Prometheus' HTTP API for every expression of the Grafana dashboard and of
rules.yml and asserts each returns a series. `.ci/run` installs the package with apt when it is
missing; the tests skip only where it could not be installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "gradcomp-dashboard.json"
CLI = [sys.executable, "-m", "gradcomp.cli"]
TOKEN = "tok-prometheus-e2e"
TRAIN_RUN = "prom-train"
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval stands for here (30 samples at 2 s scrapes)

NO_PROMETHEUS = "Debian's `prometheus` package (prometheus, promtool) is not installed; .ci/run installs it with apt"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(NO_PROMETHEUS)
    return path


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60)


# --- promtool ----------------------------------------------------------------------------------------
def test_promtool_accepts_the_rules() -> None:
    out = _promtool("check", "rules", PROM_DIR / "rules.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_accepts_the_plain_config_and_its_rules() -> None:
    out = _promtool("check", "config", PROM_DIR / "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rules.yml" in out.stdout + out.stderr  # the rule file was loaded and checked with it


def test_promtool_accepts_the_kubernetes_config_up_to_its_service_discovery(tmp_path: Path) -> None:
    """Debian's build leaves out Kubernetes service discovery, so it refuses prometheus-k8s.yml for
    `kubernetes_sd_configs` alone. This checks what that build can: the original fails for that
    field and nothing else; with each discovery block swapped for a static target, everything
    else (relabelling regexes and actions, target labels, rule files) passes `promtool check config`."""
    original = PROM_DIR / "prometheus-k8s.yml"
    full = _promtool("check", "config", original)
    if full.returncode != 0:  # a build with Kubernetes SD passes outright
        errors = [line for line in (full.stdout + full.stderr).splitlines() if "line " in line]
        assert errors and all("kubernetes_sd_configs" in line for line in errors), full.stdout + full.stderr
    cfg = yaml.safe_load(original.read_text())
    for job in cfg["scrape_configs"]:
        sd = job.pop("kubernetes_sd_configs")
        assert [s["role"] for s in sd] == ["pod"] and sd[0]["namespaces"]["names"] == ["gradcomp"], job["job_name"]
        job["static_configs"] = [{"targets": ["127.0.0.1:9"]}]
    shutil.copy(PROM_DIR / "rules.yml", tmp_path / "rules.yml")
    (tmp_path / "prometheus-k8s.yml").write_text(yaml.safe_dump(cfg))
    out = _promtool("check", "config", tmp_path / "prometheus-k8s.yml")
    assert out.returncode == 0, out.stdout + out.stderr


# --- the expressions the dashboard and the rules query --------------------------------------------------
def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, with Grafana's variables filled in for the live run."""
    dash = json.loads(DASHBOARD.read_text())
    found = [(f"dashboard panel {p['title']!r}", t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var.get("definition", ""))
        if m:  # Grafana asks for the series of the metric and reads the label off them
            found.append((f"dashboard variable ${var['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
    values = {"$__rate_interval": RATE_INTERVAL, "$job": "gradcomp-coordinator", "$run": TRAIN_RUN}
    for key, value in values.items():
        found = [(w, q.replace(key, value)) for w, q in found]
    assert not any("$" in q for _, q in found), [q for _, q in found if "$" in q]
    return found


def with_bool(expr: str) -> str:
    """An alert condition with `bool` after each comparison: 1/0 series instead of none while the
    alert is quiet, so a query shows that every series the alert needs exists and lines up."""
    out, depth, quote, i = [], 0, False, 0
    while i < len(expr):
        c = expr[i]
        if c == '"':
            quote = not quote
        elif not quote and c in "{}":
            depth += 1 if c == "{" else -1
        if not quote and depth == 0:
            m = re.match(r"==|!=|>=|<=|>|<", expr[i:])
            if m and not re.match(r"\s*bool\b", expr[i + len(m.group()) :]):
                out.append(m.group() + " bool")
                i += len(m.group())
                continue
        out.append(c)
        i += 1
    return "".join(out)


def rule_queries() -> list[tuple[str, str]]:
    """Recording rules: their expression and the recorded series; alerts: their condition with `bool`."""
    found = []
    for group in yaml.safe_load((PROM_DIR / "rules.yml").read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                found += [(f"rule {rule['record']}", rule["expr"]), (f"recorded {rule['record']}", rule["record"])]
            else:
                found.append((f"alert {rule['alert']}", with_bool(rule["expr"])))
    return found


def test_alert_conditions_get_bool_comparisons() -> None:
    assert with_bool('up{job="a"} == 0') == 'up{job="a"} == bool 0'
    assert with_bool('x{r=~"a|b",s!="c"} > 0.05') == 'x{r=~"a|b",s!="c"} > bool 0.05'
    assert with_bool("changes(a[30m]) == 0 and b > 0") == "changes(a[30m]) == bool 0 and b > bool 0"
    assert with_bool("a >= bool 1") == "a >= bool 1"


# --- a live stack: coordinator + client, training run on a local Ray, Prometheus scraping them ------
def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 30) -> None:
    """Signal a process started in its own session, then kill its whole group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):  # whatever it started in its session (Ray's own go with Ray)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
    with log.open("w") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, stdin=subprocess.DEVNULL
        )


def check_alive(procs: list[subprocess.Popen[Any]], logs: list[Path]) -> None:
    dead = [p.args for p in procs if p.poll() is not None]
    tail = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs if log.is_file())
    assert not dead, f"exited early: {dead}\n{tail}"


def wait_for(what: str, check: Any, procs: list[subprocess.Popen[Any]], timeout: float, logs: list[Path]) -> None:
    """Poll `check()` until it is true; fail if one of `procs` dies or `timeout` passes."""
    end = time.monotonic() + timeout
    while not check():
        check_alive(procs, logs)
        assert time.monotonic() < end, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.5)


# The example job files, made small (coordinator) or endless (training: it runs until the test stops it).
FED_ARGS = ["--config", str(ROOT / "examples" / "fed-digits-dp.yaml"), "--set", "rounds=2", "--set", "local.epochs=1"]
FED_ARGS += [f"--set={k}=1" for k in ("clients.expected", "clients.min", "round.min_clients", "server.linger_seconds")]
FED_ARGS += ["--set=server.port=0", "--set=server.metrics_port=0", "--set=server.metrics_linger_seconds=600"]
TRAIN_ARGS = [str(ROOT / "examples" / "digits-dp.yaml"), f"--set=name={TRAIN_RUN}", "--set=epochs=1000"]
# dp.unprotected_metrics: the dashboard's loss panel needs the un-noised loss a DP run keeps in by default
TRAIN_ARGS += ["--set=checkpoint.every_epochs=0", "--set=dp.unprotected_metrics=true"]


def prometheus_config(tmp: Path, targets: dict[str, str]) -> Path:
    """deploy/prometheus/prometheus.yml with each scrape job's targets replaced by a live one, 2 s
    scrapes (a scrape of a busy 2-core machine may take over 1 s: one that times out reads as down)
    and 1 s rule and evaluation intervals; rules.yml as it is, apart from its group intervals."""
    rules = yaml.safe_load((PROM_DIR / "rules.yml").read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    (tmp / "rules.yml").write_text(yaml.safe_dump(rules))
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"] = {"scrape_interval": "2s", "scrape_timeout": "2s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(tmp / "rules.yml")]
    left = dict(targets)
    for job in cfg["scrape_configs"]:
        labels = (job.get("static_configs") or [{}])[0].get("labels", {})
        job.pop("file_sd_configs", None)
        job["static_configs"] = [{"targets": [left.pop(job["job_name"])], "labels": labels}]
    assert not left, f"deploy/prometheus/prometheus.yml has no scrape job for {sorted(left)}"
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    """Series (vector/matrix) or a scalar (as one series) of an instant query; raises on a bad query."""
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise AssertionError(f"Prometheus refused {expr!r}: {err.read().decode()}") from None
    data = body["data"]
    return [{"value": data["result"]}] if data["resultType"] in ("scalar", "string") else data["result"]


@pytest.fixture
def local_ray_with_metrics() -> Iterator[tuple[str, int]]:
    """A local Ray whose metrics agent exports node metrics on a known port: (GCS address, port)."""
    import ray

    from gradcomp.raycluster import connect

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    connect(num_cpus=2, log_to_driver=False, _metrics_export_port=port)
    try:
        yield ray.get_runtime_context().gcs_address, port
    finally:
        ray.shutdown()


@pytest.fixture
def live_stack(tmp_path: Path, local_ray_with_metrics: tuple[str, int]) -> Iterator[dict[str, Any]]:
    """Coordinator + client, training run, Prometheus: started here, every one stopped at the end."""
    prometheus = _tool("prometheus")
    gcs, ray_port = local_ray_with_metrics
    env = {**os.environ, "GRADCOMP_TOKENS": f"client-0={TOKEN}", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    runs, procs, logs = tmp_path / "runs", [], []
    stack: dict[str, Any] = {"procs": procs, "logs": logs}

    def start(name: str, argv: list[str]) -> subprocess.Popen[Any]:
        logs.append(tmp_path / f"{name}.log")
        procs.append(spawn(argv, logs[-1], env))
        return procs[-1]

    try:
        serve = start("serve", [*CLI, "serve", *FED_ARGS, "--runs-dir", str(runs)])
        endpoint = runs / "fed-digits-dp" / "endpoint.json"
        wait_for("the coordinator's endpoint.json", endpoint.is_file, [serve], 120, logs)
        ports = json.loads(endpoint.read_text())
        client = start(
            "client", [*CLI, "client", "--server", f"127.0.0.1:{ports['port']}", "--token", TOKEN, "--quiet"]
        )
        train_port = free_port()
        train_argv = ["--address", gcs, "--runs-dir", str(runs), "--metrics-port", str(train_port)]
        stack["train"] = start("train", [*CLI, "train", *TRAIN_ARGS, *train_argv])
        targets = {
            "gradcomp-coordinator": f"127.0.0.1:{ports['metrics_port']}",
            "gradcomp-train": f"127.0.0.1:{train_port}",
            "ray": f"127.0.0.1:{ray_port}",
        }
        web = f"127.0.0.1:{free_port()}"
        start(
            "prometheus",
            [prometheus, f"--config.file={prometheus_config(tmp_path, targets)}", f"--web.listen-address={web}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", "--storage.tsdb.retention.time=1h", "--log.level=warn"],
        )  # fmt: skip
        stack["url"], stack["jobs"] = f"http://{web}", sorted(targets)
        stack["alive"] = [p for p in procs if p is not client]  # the client leaves after 2 rounds
        yield stack
    finally:
        for proc in reversed(procs):  # Prometheus first; the training driver gets Ctrl-C, as a user would
            stop(proc, signal.SIGINT if proc is stack.get("train") else signal.SIGTERM)


def _scraped_twice(prom: str, jobs: list[str]) -> bool:
    """Two successful scrapes of every job so far (up is 1 per good scrape), not necessarily the last."""
    try:
        got = {s["metric"]["job"]: float(s["value"][1]) for s in query(prom, "sum by (job) (sum_over_time(up[10m]))")}
    except OSError:  # Prometheus not listening yet
        return False
    return all(got.get(job, 0) >= 2 for job in jobs)


def _empty(prom: str, queries: list[tuple[str, str]]) -> list[str]:
    return [f"{where}: {expr}" for where, expr in queries if not query(prom, expr)]


@pytest.mark.slow
@pytest.mark.ray
def test_every_dashboard_and_rule_expression_returns_data_from_live_targets(live_stack: dict[str, Any]) -> None:
    prom, alive, logs = live_stack["url"], live_stack["alive"], live_stack["logs"]
    wait_for("two scrapes of every target", lambda: _scraped_twice(prom, live_stack["jobs"]), alive, 240, logs)
    queries = dashboard_queries() + rule_queries()
    # The training run needs its first epoch (test accuracy, epsilon) and the rules an evaluation:
    # poll until every expression has data (bounded), then report what is still missing.
    end = time.monotonic() + 240
    while (missing := _empty(prom, queries)) and time.monotonic() < end:
        check_alive(alive, logs)
        time.sleep(1)
    assert not missing, "no series for:\n" + "\n".join(missing)
    loaded = json.loads(urllib.request.urlopen(f"{prom}/api/v1/rules", timeout=10).read())["data"]["groups"]
    written = yaml.safe_load((PROM_DIR / "rules.yml").read_text())["groups"]
    assert sum(len(g["rules"]) for g in loaded) == sum(len(g["rules"]) for g in written)
    unhealthy = [(r["name"], r.get("lastError")) for g in loaded for r in g["rules"] if r["health"] != "ok"]
    assert not unhealthy, unhealthy
    # The training run's own numbers made it through: both ranks sent compressed gradients.
    run = f'{{run="{TRAIN_RUN}"}}'
    sent = query(prom, f"gradcomp_train_bytes_sent_total{run} > 0")
    assert sorted(s["metric"]["rank"] for s in sent) == ["0", "1"]
    ratio = query(prom, f"sum(gradcomp_train_dense_bytes_total{run}) / sum(gradcomp_train_bytes_sent_total{run})")
    assert float(ratio[0]["value"][1]) > 5  # shared-seed random-k sends 10% of the values, no indices
    eps = query(prom, f"gradcomp_train_privacy_epsilon{run}")
    assert 0 < float(eps[0]["value"][1]) < float("inf")
