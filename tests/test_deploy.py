"""Checks on deploy/: the manifests and configs are what the code accepts.

Docker cannot build here and there is no Kubernetes cluster, so these tests check what can be
checked without them, against the real code: every `gradcomp` command line in deploy/ parses
with the real CLI parser and its job file validates with the real config models; every metric
in the dashboard and rules exists in gradcomp.metrics (or in Ray's own exporter); the
Dockerfile installs what the Makefile installs; the Ray launcher config passes Ray's own
validator; nothing secret is committed; and the TLS script produces certificates and tokens
that a real `gradcomp serve` / `gradcomp client` pair accepts over mutual TLS.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradcomp.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MAKE_CERTS = DEPLOY / "tls" / "make-certs.sh"
HEALTHCHECK = DEPLOY / "healthcheck.py"
IMAGE_WORKDIR = "/opt/gradcomp"  # WORKDIR of deploy/Dockerfile; examples/ is copied under it
VERBS = {"train", "serve", "client", "fedsim", "sweep", "bench"}
IMAGE = re.compile(r"^(?:[\w.-]+(?::\d+)?/)*gradcomp:[\w.-]+$")  # an image built from deploy/Dockerfile
SEPARATORS = {";", "&&", "||", "|", "then", "else", "fi", "do", "done"}


# --- collecting files and command lines -----------------------------------------------------------
def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in yaml_files() for d in load_docs(p) if isinstance(d, dict)]


def walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from walk_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk_strings(v)


def walk_dicts(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk_dicts(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk_dicts(v)


def gradcomp_argvs(text: str) -> list[list[str]]:
    """Every `gradcomp VERB ...` invocation in a shell string (argv without `gradcomp`).

    Splits on shell separators; a quoted argument that itself starts with `gradcomp ` (e.g.
    `ray exec cluster.yaml 'gradcomp train ...'`) is searched recursively.
    """
    out: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines() if "\n" in text else [text]:
        if "gradcomp" not in line:
            continue
        try:
            tokens = shlex.split(line.replace(";", " ; "), comments=True)
        except ValueError:
            continue
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            is_cli = tok == "gradcomp" or IMAGE.match(tok) is not None  # `docker run ... gradcomp:cpu VERB`
            if is_cli and i + 1 < len(tokens) and tokens[i + 1] in VERBS:
                j = i + 1
                while j < len(tokens) and tokens[j] not in SEPARATORS:
                    j += 1
                out.append(tokens[i + 1 : j])
                i = j
                continue
            if tok.startswith("gradcomp ") and tok != line:
                out.extend(gradcomp_argvs(tok))
            i += 1
    return out


def container_argvs(doc: dict[str, Any]) -> list[list[str]]:
    """Commands of k8s containers: `command`+`args`, or only `args` under the image's `gradcomp` entrypoint."""
    found = []
    for d in walk_dicts(doc):
        if "image" not in d or not isinstance(d.get("image"), str) or not str(d["image"]).startswith("gradcomp"):
            continue
        command, args = d.get("command"), d.get("args")
        if command is None and args:
            found.append([str(a) for a in args])
    return found


def collect_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every gradcomp command line in deploy/ (YAML values, comments, Dockerfile, docs)."""
    found: list[tuple[str, list[str]]] = []
    for path in yaml_files():
        rel = str(path.relative_to(ROOT))
        for doc in load_docs(path):
            for s in walk_strings(doc):
                found += [(rel, argv) for argv in gradcomp_argvs(s)]
            found += [(rel, argv) for argv in container_argvs(doc)]
        for line in path.read_text().splitlines():  # usage lines in comments
            if line.lstrip().startswith("#"):
                found += [(f"{rel} (comment)", argv) for argv in gradcomp_argvs(line.lstrip()[1:])]
    dockerfile = DEPLOY / "Dockerfile"
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#"):
            found += [("deploy/Dockerfile (comment)", argv) for argv in gradcomp_argvs(line.lstrip()[1:])]
    found.append(("deploy/Dockerfile CMD", dockerfile_instruction_json("CMD")))
    readme = DEPLOY / "README.md"
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", readme.read_text(), flags=re.S):
        found += [("deploy/README.md", argv) for argv in gradcomp_argvs(block)]
    return found


def dockerfile_instruction_json(name: str) -> list[str]:
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith(name + " "):
            return json.loads(line[len(name) + 1 :])
    raise AssertionError(f"deploy/Dockerfile has no {name} instruction")


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse with the real CLI parser; an argparse error becomes an assertion naming the argv."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:  # --help / --version
            return argparse.Namespace(verb=None)
        raise AssertionError(f"gradcomp {shlex.join(argv)}: {err.getvalue().strip()}") from None


COMMANDS = collect_commands()


# --- YAML and command lines -----------------------------------------------------------------------
@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses_and_k8s_objects_are_named(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is a {type(doc).__name__}, not a mapping"
        if isinstance(doc.get("apiVersion"), str) and doc.get("kind") != "Kustomization":  # a Kubernetes object
            assert doc.get("kind"), f"{path}: object without kind"
            assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without metadata.name"
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == "gradcomp", (
                    f"{path}: {doc['kind']} not in namespace gradcomp"
                )


def test_every_verb_that_deploy_promises_has_a_command_line() -> None:
    verbs = {argv[0] for _, argv in COMMANDS if argv and argv[0] in VERBS}
    assert {"train", "fedsim", "serve", "client"} <= verbs, f"found only {sorted(verbs)}"
    assert len(COMMANDS) >= 12, COMMANDS


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[f"{w}: {' '.join(a[:2])}" for w, a in COMMANDS])
def test_command_line_is_a_valid_cli_call(where: str, argv: list[str]) -> None:
    args = parse(argv)
    if args.verb in ("train", "fedsim", "sweep"):
        assert args.runs_dir, where


def _repo_path(path: str) -> Path | None:
    """A job file named in a deploy command, as a path in this repository (None: from a ConfigMap)."""
    if path.startswith(IMAGE_WORKDIR + "/"):
        return ROOT / path[len(IMAGE_WORKDIR) + 1 :]
    if path.startswith("/etc/gradcomp/job/"):
        return None
    return ROOT / path


def _configmap_file(name: str) -> str:
    for _, doc in all_docs():
        if doc.get("kind") == "ConfigMap" and name in doc.get("data", {}):
            return doc["data"][name]
    raise AssertionError(f"no ConfigMap in deploy/ provides {name}")


@pytest.mark.parametrize(
    "where,argv",
    [(w, a) for w, a in COMMANDS if a and a[0] in ("train", "fedsim", "serve")],
    ids=lambda x: x if isinstance(x, str) else " ".join(x[:2]),
)
def test_job_files_named_in_commands_validate(where: str, argv: list[str], tmp_path: Path) -> None:
    """The job file each deploy command names exists (in the repo or a ConfigMap) and passes the real config model."""
    args = parse(argv)
    job_path = args.config if args.verb == "serve" else args.job
    local = _repo_path(job_path)
    if local is None:
        local = tmp_path / Path(job_path).name
        local.write_text(_configmap_file(Path(job_path).name))
    assert local.is_file(), f"{where}: job file {job_path} is not in the repository ({local})"
    if args.verb == "train":
        from gradcomp.worker.launch import load_train_job

        load_train_job(str(local), args.overrides, args.workers)
    elif args.verb == "fedsim":
        from gradcomp.sim.setup import load_fedsim_job

        load_fedsim_job(local, args.overrides)
    else:
        from gradcomp.config.fed import load_fed_job

        job = load_fed_job(local, args.overrides)
        if args.host not in (None, "127.0.0.1", "localhost"):
            assert job.server.tls, f"{where}: a coordinator reachable from the network must have TLS"


def test_shared_runs_dir_on_ray_clusters() -> None:
    """Ray jobs write runs and checkpoints to the shared mount, which every Ray node mounts."""
    for where, argv in COMMANDS:
        if argv[0] in ("train", "fedsim") and ("kuberay" in where or "deploy/ray" in where):
            args = parse(argv)
            assert args.runs_dir.startswith("/mnt/gradcomp/"), f"{where}: --runs-dir {args.runs_dir} is not shared"
            assert args.address == "auto", f"{where}: a cluster job should join the cluster (--address auto)"
    claims = {d["metadata"]["name"]: d for _, d in all_docs() if d.get("kind") == "PersistentVolumeClaim"}
    ray_objects = [(p, d) for p, d in all_docs() if d.get("kind") in ("RayCluster", "RayJob")]
    assert len(ray_objects) == 3
    for path, doc in ray_objects:
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            pod = group["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            for c in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert "/mnt/gradcomp" in mounts, f"{path}: container {c['name']} lacks the shared mount"
                claim = volumes[mounts["/mnt/gradcomp"]]["persistentVolumeClaim"]["claimName"]
                assert claim in claims, f"{path}: claim {claim} is not defined in deploy/kuberay"
                assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], "shared storage must be RWX"
            assert group["rayStartParams"].get("metrics-export-port") == "8080", f"{path}: metrics port for Prometheus"
        import ray

        assert spec["rayVersion"] == ray.__version__, f"{path}: rayVersion should be the tested Ray {ray.__version__}"
        assert spec.get("authOptions", {}).get("mode") == "token", f"{path}: Ray token authentication must be on"


# --- Kubernetes coordinator and clients -----------------------------------------------------------
def _pod_specs() -> list[tuple[Path, dict[str, Any], dict[str, Any]]]:
    """(file, owner object, pod spec) for every pod template in deploy/k8s."""
    out = []
    for path, doc in all_docs():
        if "deploy/k8s" in str(path) and doc.get("kind") in ("StatefulSet", "Deployment", "Job"):
            out.append((path, doc, doc["spec"]["template"]))
    return out


def test_k8s_volumes_ports_and_selectors_are_consistent() -> None:
    docs = [d for p, d in all_docs() if "deploy/k8s" in str(p)]
    configmaps = {d["metadata"]["name"] for d in docs if d.get("kind") == "ConfigMap"}
    assert _pod_specs(), "no workloads in deploy/k8s"
    for path, owner, template in _pod_specs():
        pod = template["spec"]
        declared = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in owner["spec"].get("volumeClaimTemplates", [])}
        assert pod["securityContext"].get("runAsNonRoot") is True, f"{path}: pods run as non-root"
        for c in pod["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in declared or m["name"] in claims, f"{path}: mount {m['name']} has no volume"
        for v in declared.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, f"{path}: ConfigMap {v['configMap']['name']} missing"
            if "secret" in v:
                mode = v["secret"].get("defaultMode", 0o644)
                assert mode & 0o044 == 0o040, f"{path}: secret {v['name']} must be group-readable only (fsGroup)"
                assert pod["securityContext"].get("fsGroup"), f"{path}: secret files need fsGroup to be readable"
    services = [d for d in docs if d.get("kind") == "Service"]
    sts = next(d for d in docs if d.get("kind") == "StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    port_names = {
        p["name"]: p["containerPort"] for c in sts["spec"]["template"]["spec"]["containers"] for p in c["ports"]
    }
    assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in services}
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items(), f"Service {svc['metadata']['name']} selects nothing"
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service port {port} targets an unknown container port"
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port_names["metrics"]


def _coordinator_container() -> dict[str, Any]:
    sts = next(d for p, d in all_docs() if d.get("kind") == "StatefulSet")
    return sts["spec"]["template"]["spec"]["containers"][0]


def test_coordinator_serves_tls_with_mounted_secrets_and_resumes_its_own_checkpoint(tmp_path: Path) -> None:
    from gradcomp.config.fed import load_fed_job
    from gradcomp.server import store

    container = _coordinator_container()
    script = container["command"][-1]
    serves = [parse(a) for a in gradcomp_argvs(script)]
    assert [a.resume for a in serves] == [True, False], "resume when the checkpoint exists, else start fresh"
    job_file = tmp_path / "fed.yaml"
    job_file.write_text(_configmap_file("fed.yaml"))
    job = load_fed_job(job_file)
    for args in serves:
        assert args.port == job.server.port and args.metrics_port == job.server.metrics_port
    checkpoint = f"{serves[0].runs_dir}/{job.name}/{store.FILENAME}"
    assert f"[ -f {checkpoint} ]" in script, f"the resume test must look for {checkpoint}"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for path in (job.server.tls_cert, job.server.tls_key, job.server.tls_client_ca, job.server.tokens_file):
        assert path is not None and str(path.parent) in mounts, f"{path} is not on a mounted volume"
    assert any(serves[0].runs_dir.startswith(m) for m in mounts), "the run directory must be on the volume"


def test_coordinator_probes_use_the_grpc_health_service_over_its_tls() -> None:
    container = _coordinator_container()
    probe_parser = _healthcheck_parser()
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[kind]["exec"]["command"]
        assert command[0] == "gradcomp-healthcheck"
        args = probe_parser.parse_args(command[1:])
        assert args.address.endswith(":50051")
        for f in (args.tls_ca, args.tls_cert, args.tls_key):
            assert f is not None and str(f.parent) in mounts, f"{kind}: {f} is not mounted"
    copied = re.search(r"^COPY deploy/healthcheck.py (\S+)$", (DEPLOY / "Dockerfile").read_text(), flags=re.M)
    assert copied and copied.group(1).endswith("/gradcomp-healthcheck"), "the image must ship the probe"


def test_clients_job_matches_the_coordinator() -> None:
    from gradcomp.config.fed import FedJob

    job_doc = next(d for p, d in all_docs() if d.get("kind") == "Job")
    fed = FedJob.model_validate(yaml.safe_load(_configmap_file("fed.yaml")))
    assert job_doc["spec"]["completions"] == fed.clients.expected, "one client pod per expected client"
    container = job_doc["spec"]["template"]["spec"]["containers"][0]
    script = container["command"][-1]
    (argv,) = gradcomp_argvs(script)
    args = parse(argv)
    host, port = args.server.rsplit(":", 1)
    assert int(port) == fed.server.port and host.startswith("gradcomp-coordinator.")
    assert args.token is None or "GRADCOMP_TOKEN" in os.environ, "the token must not be on the command line"
    assert "export GRADCOMP_TOKEN=" in script
    assert args.tls_ca and args.tls_cert and args.tls_key, "clients must verify the coordinator and present a cert"
    assert args.shard.endswith(f"/{fed.clients.expected}")


def test_secret_names_match_what_make_certs_prints(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = subprocess.run(
        ["bash", str(MAKE_CERTS), "-o", str(tmp_path / "tls"), "-c", "1"], capture_output=True, text=True, check=True
    ).stdout
    printed = set(re.findall(r"create secret generic (\S+)", out))
    referenced = {
        v["secret"]["secretName"]
        for _, d in all_docs()
        for v in walk_dicts(d)
        if isinstance(v.get("secret"), dict) and "secretName" in v["secret"]
    }
    assert referenced and referenced <= printed, f"manifests use {referenced}, make-certs.sh creates {printed}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomization_builds() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout) if d]
    assert {"Namespace", "ConfigMap", "Service", "StatefulSet", "Job"} <= set(kinds)


# --- Ray cluster launcher -----------------------------------------------------------------------------
def test_ray_cluster_yaml_passes_rays_validator() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    options = " ".join(raw["docker"]["run_options"])
    assert "-v /mnt/gradcomp:/mnt/gradcomp" in options, "the shared run directory must reach the containers"
    if dockerfile_instruction_json("ENTRYPOINT"):
        assert '--entrypoint=""' in options, "the launcher starts `bash` in the container: reset the entrypoint"
    assert "-e RAY_AUTH_MODE=token" in options, "Ray token authentication on every node"
    assert "~/.ray/auth_token" in raw["file_mounts"], "every node needs the cluster's token"
    starts = " ".join(raw["head_start_ray_commands"] + raw["worker_start_ray_commands"])
    assert starts.count("--metrics-export-port=8080") == 2, "every node exports metrics for Prometheus"


# --- metrics: dashboard and rules use names that exist ----------------------------------------------
def _exported() -> dict[str, tuple[str, set[str]]]:
    """Exposition name -> (family name, label names) for every gradcomp metric, with the suffixes
    prometheus_client adds (counter _total/_created, histogram _bucket/_sum/_count/_created)."""
    from prometheus_client.metrics import MetricWrapperBase

    from gradcomp import metrics

    out: dict[str, tuple[str, set[str]]] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        fam = next(iter(obj.describe())) if hasattr(obj, "describe") else None
        name, kind, labels = fam.name, fam.type, set(obj._labelnames)
        suffixes = {
            "counter": ["_total", "_created"],
            "histogram": ["_bucket", "_sum", "_count", "_created"],
            "summary": ["", "_sum", "_count", "_created"],
        }.get(kind, [""])
        for s in suffixes:
            out[name + s] = (name, labels | ({"le"} if s == "_bucket" else set()))
    assert out, "gradcomp.metrics defines no metrics"
    return out


def _exprs() -> list[tuple[str, str]]:
    dash = json.loads((DEPLOY / "grafana" / "gradcomp-dashboard.json").read_text())
    exprs = [(f"dashboard: {p['title']}", t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [("dashboard: variables", v["definition"]) for v in dash["templating"]["list"] if v.get("definition")]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            exprs.append((f"rules: {rule.get('record') or rule.get('alert')}", rule["expr"]))
    return exprs


SELECTOR = re.compile(r"\b((?:gradcomp|ray)_[a-zA-Z0-9_]+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")


def test_metric_names_and_labels_in_dashboard_and_rules_exist() -> None:
    from gradcomp.metrics import REJECT_REASONS

    exported = _exported()
    ray_sources = "\n".join(p.read_text() for p in (Path(_ray_dir()) / "dashboard").rglob("*.py"))
    seen = set()
    for where, expr in _exprs():
        for name, selector in SELECTOR.findall(expr):
            seen.add(name)
            if name.startswith("ray_"):
                assert f'"{name[4:]}"' in ray_sources, f"{where}: Ray exports no metric {name}"
                continue
            assert name in exported, f"{where}: {name} is not exported by gradcomp.metrics ({expr})"
            labels = exported[name][1] | {"job", "instance"}
            for label, op, value in MATCHER.findall(selector or ""):
                assert label in labels, f"{where}: {name} has no label {label!r}"
                if label == "reason":
                    wanted = value.split("|") if op in ("=~", "!~") else [value]
                    assert set(wanted) <= set(REJECT_REASONS), f"{where}: unknown reject reason in {value!r}"
        for label in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for lab in (x.strip() for x in label.split(",")):
                used = [n for n, _ in SELECTOR.findall(expr) if n in exported]
                assert any(lab in exported[n][1] for n in used), f"{where}: no metric in {expr!r} has label {lab!r}"
    # The dashboard must cover the federated job, the training runs and the Ray nodes.
    for needed in (
        "gradcomp_fed_uplink_bytes_total",
        "gradcomp_fed_uplink_dense_bytes_total",
        "gradcomp_fed_global_test_accuracy",
        "gradcomp_fed_privacy_epsilon",
        "gradcomp_fed_updates_rejected_total",
        "gradcomp_fed_round_duration_seconds_bucket",
        "gradcomp_train_examples_total",
        "gradcomp_train_bytes_sent_total",
        "gradcomp_train_dense_bytes_total",
        "gradcomp_train_step_duration_seconds_bucket",
        "gradcomp_train_loss",
        "gradcomp_train_test_accuracy",
        "gradcomp_train_privacy_epsilon",
        "gradcomp_train_learning_rate",
        "gradcomp_train_restores_total",
    ):
        assert needed in seen, f"the dashboard/rules never show {needed}"


def _ray_dir() -> str:
    import ray

    return os.path.dirname(ray.__file__)


def test_dashboard_is_well_formed() -> None:
    dash = json.loads((DEPLOY / "grafana" / "gradcomp-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dash["uid"] and dash["title"]
    for p in dash["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        for t in p.get("targets", []):
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", p["title"]


def test_prometheus_configs_scrape_the_coordinator_and_ray() -> None:
    rules_file = DEPLOY / "prometheus" / "rules.yml"
    for name in ("prometheus.yml", "prometheus-k8s.yml"):
        cfg = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
        jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
        assert {"gradcomp-coordinator", "gradcomp-train", "ray"} <= set(jobs), name
        for rule_file in cfg["rule_files"]:
            assert (DEPLOY / "prometheus" / rule_file).resolve() == rules_file.resolve()
    local = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    coordinator = next(j for j in local["scrape_configs"] if j["job_name"] == "gradcomp-coordinator")
    assert coordinator["static_configs"][0]["targets"][0].endswith(":9100")
    train_job = next(j for j in local["scrape_configs"] if j["job_name"] == "gradcomp-train")
    assert train_job["static_configs"][0]["targets"][0].endswith(":9101")
    # KubeRay: the train RayJob's driver serves :9101 on the head pod's port named "train-metrics"
    rayjob = load_docs(DEPLOY / "kuberay" / "rayjob-train.yaml")[0]
    args = build_parser().parse_args(shlex.split(rayjob["spec"]["entrypoint"])[1:])
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "train-metrics", "containerPort": args.metrics_port} in head["ports"]
    assert args.metrics_host == "0.0.0.0"
    ray_job = next(j for j in local["scrape_configs"] if j["job_name"] == "ray")
    from ray._private import ray_constants

    assert ray_job["file_sd_configs"][0]["files"][0].endswith(ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE)
    # Alert rules refer to the scrape job by the name used here.
    assert 'job="gradcomp-coordinator"' in rules_file.read_text()


# --- Dockerfile vs Makefile / README install steps ---------------------------------------------------
def _makefile_torch() -> tuple[str, str]:
    text = (ROOT / "Makefile").read_text()
    spec = re.search(r"^TORCH_SPEC \?= (\S+)$", text, flags=re.M)
    index = re.search(r"--index-url (\S+/cpu)", text)
    assert spec and index, "Makefile no longer declares TORCH_SPEC / the CPU index"
    return spec.group(1), index.group(1)


def _dockerfile_args() -> dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", text, flags=re.M))


def test_dockerfile_installs_what_the_makefile_installs() -> None:
    spec, cpu_index = _makefile_torch()
    args = _dockerfile_args()
    text = (DEPLOY / "Dockerfile").read_text()
    assert f"torch=={args['TORCH_VERSION']}" == spec, f"Dockerfile pins torch {args['TORCH_VERSION']}, Makefile {spec}"
    assert args["TORCH_CPU_INDEX"] == cpu_index
    assert 'cpu) default_spec="torch==${TORCH_VERSION} --index-url ${TORCH_CPU_INDEX}"' in text
    assert 'cuda) default_spec="torch==${TORCH_VERSION}"' in text, "CUDA: the default PyPI wheel, as in the Makefile"
    torch_at = text.index("pip install ${TORCH_SPEC:-$default_spec}")
    package_at = text.index("python -m pip install .")
    assert torch_at < package_at, "torch must be installed before the package (as `make install` does)"
    make = (ROOT / "Makefile").read_text()
    assert make.index("pip install $(TORCH_SPEC)") < make.index("pip install -e '.[dev]'")
    assert dockerfile_instruction_json("ENTRYPOINT")[-1] == "gradcomp"
    assert tuple(int(x) for x in args["PYTHON_VERSION"].split(".")) >= (3, 10), "pyproject needs Python >= 3.10"


def test_readmes_give_the_same_install_steps() -> None:
    spec, cpu_index = _makefile_torch()
    docs = (DEPLOY / "README.md").read_text()
    assert "docker build -f deploy/Dockerfile" in docs and "VARIANT=cuda" in docs
    pins = set(re.findall(r"torch==[0-9][\w.+]*", docs))
    assert pins == {spec}, f"deploy/README.md pins {pins}, the Makefile {spec}"
    assert cpu_index in docs
    readme = ROOT / "README.md"
    if readme.is_file():
        other = set(re.findall(r"torch==[0-9][\w.+]*", readme.read_text()))
        assert other <= {spec}, f"README.md pins {other}, the Makefile and the image {spec}"


def test_build_context_excludes_local_state_and_keys() -> None:
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for entry in (".venv", ".git", "runs", "deploy/tls/out", "**/*.key", "**/*.token"):
        assert entry in ignored, f"deploy/Dockerfile.dockerignore must exclude {entry}"
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert src not in ignored, f"COPY {src} is excluded from the build context"


def test_dockerfile_copies_only_paths_that_exist() -> None:
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            for src in parts[:-1]:
                assert (ROOT / src).exists(), (
                    f"Dockerfile: COPY {src}: not in the repository (build context is the root)"
                )


# --- no secrets in deploy/ -----------------------------------------------------------------------------
SECRET_KEYS = re.compile(
    r"^\s*-?\s*([\w.-]*(?:token|password|secret|api_key|apikey|private_key)[\w.-]*)\s*:\s*(\S.*)$", re.I
)
REFERENCE_KEYS = ("name", "file", "env", "path", "ref")  # secretName, tokens_file, ...: point at a secret


def test_nothing_in_deploy_embeds_a_secret() -> None:
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        if "out" in path.relative_to(DEPLOY).parts:
            continue
        text = path.read_text(errors="replace")
        rel = path.relative_to(ROOT)
        assert "-----BEGIN" not in text, f"{rel}: contains a PEM block"
        assert not re.search(r"\b[0-9a-f]{32,}\b", text), f"{rel}: contains a long hex string (a token?)"
        assert not re.search(r"[A-Za-z0-9+/]{60,}={0,2}", text), f"{rel}: contains a long base64 string"
        if path.suffix in (".yaml", ".yml"):
            for line in text.splitlines():
                m = SECRET_KEYS.match(line)
                if m and not line.lstrip().startswith("#") and not m.group(1).lower().endswith(REFERENCE_KEYS):
                    value = m.group(2).strip()
                    assert value.startswith(("/", "$", "{", "[")) or value in ('""', "''", "null"), (
                        f"{rel}: {line.strip()!r} looks like a literal secret"
                    )
            for doc in load_docs(path):
                if isinstance(doc, dict) and doc.get("kind") == "Secret":
                    assert not doc.get("data") and not doc.get("stringData"), f"{rel}: a Secret with values"
    ignore = (DEPLOY / "tls" / ".gitignore").read_text().split()
    assert "out/" in ignore, "make-certs.sh's default output must be git-ignored"


# --- TLS material that the real coordinator and client accept ---------------------------------------
def _healthcheck_parser() -> argparse.ArgumentParser:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gradcomp_healthcheck", HEALTHCHECK)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


@pytest.mark.server
def test_healthcheck_reports_the_serving_status() -> None:
    """The probe's exit status follows grpc.health.v1: 0 SERVING, 1 NOT_SERVING/unreachable, 2 misuse."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        probe = [sys.executable, str(HEALTHCHECK), "--address", f"127.0.0.1:{port}", "--timeout", "5"]
        ok = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
        servicer.set("gradcomp.v1.Coordinator", health_pb2.HealthCheckResponse.NOT_SERVING)
        down = subprocess.run([*probe, "--service", "gradcomp.v1.Coordinator"], capture_output=True, text=True)
        assert down.returncode == 1 and "NOT_SERVING" in down.stdout
        unknown = subprocess.run([*probe, "--service", "no.such.Service"], capture_output=True, text=True)
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout
        misuse = subprocess.run([*probe, "--tls-cert", "x.crt"], capture_output=True, text=True)
        assert misuse.returncode == 2 and "go together" in misuse.stderr
    finally:
        server.stop(0)


def _openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = tmp_path_factory.mktemp("tls") / "certs"
    subprocess.run(
        ["bash", str(MAKE_CERTS), "-o", str(out), "-c", "2", "-n", "localhost", "-n", "coord.example.test"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def test_make_certs_writes_a_verifiable_chain(certs: Path) -> None:
    names = {p.name for p in certs.iterdir()}
    assert {"ca.crt", "ca.key", "server.crt", "server.key", "tokens.txt"} <= names
    assert {f"client-{i}.{ext}" for i in range(2) for ext in ("crt", "key", "token")} <= names
    verified = _openssl(
        "verify",
        "-CAfile",
        str(certs / "ca.crt"),
        *(str(certs / n) for n in sorted(names) if n.endswith(".crt") and n != "ca.crt"),
    )
    assert verified.count(": OK") == 3, verified
    server = _openssl("x509", "-in", str(certs / "server.crt"), "-noout", "-ext", "subjectAltName,extendedKeyUsage")
    assert "DNS:coord.example.test" in server and "IP Address:127.0.0.1" in server
    assert "TLS Web Server Authentication" in server
    client = _openssl("x509", "-in", str(certs / "client-0.crt"), "-noout", "-ext", "extendedKeyUsage", "-subject")
    assert (
        "TLS Web Client Authentication" in client and "Server" not in client and re.search(r"CN ?= ?client-0", client)
    )
    ca = _openssl("x509", "-in", str(certs / "ca.crt"), "-noout", "-ext", "basicConstraints")
    assert "CA:TRUE" in ca
    for p in certs.iterdir():
        if p.suffix in (".key", ".token") or p.name == "tokens.txt":
            assert p.stat().st_mode & 0o077 == 0, f"{p.name} is readable by others"
    from gradcomp.server.auth import parse_tokens_text

    tokens = parse_tokens_text((certs / "tokens.txt").read_text(), "tokens.txt")
    assert sorted(c.name for c in tokens.values()) == ["client-0", "client-1"]
    assert tokens[(certs / "client-1.token").read_text()].name == "client-1"
    for ident in tokens.values():  # each token is bound to the CN of its client's certificate (mutual TLS)
        subject = _openssl("x509", "-in", str(certs / f"{ident.name}.crt"), "-noout", "-subject")
        assert re.search(rf"CN ?= ?{ident.cert_identity}$", subject.strip()), (ident, subject)


def test_make_certs_refuses_to_overwrite_keys(certs: Path) -> None:
    before = (certs / "ca.key").read_bytes()
    again = subprocess.run(["bash", str(MAKE_CERTS), "-o", str(certs)], capture_output=True, text=True)
    assert again.returncode == 1 and "already holds keys" in again.stderr
    assert (certs / "ca.key").read_bytes() == before
    bad = subprocess.run(["bash", str(MAKE_CERTS), "-o", str(certs.parent / "x"), "-c", "many"], capture_output=True)
    assert bad.returncode == 2


def _fed_job(certs: Path, tmp: Path, port: int = 0) -> Path:
    job = {
        "name": "tls-check",
        "task": {"name": "digits-mlp"},
        "rounds": 1,
        "clients": {"expected": 1, "min": 1},
        "round": {"fraction": 1.0, "min_clients": 1, "deadline_seconds": 60},
        "local": {"epochs": 1, "batch_size": 64},
        "compression": "rtopk(ratio=0.05, r=0.2) | ef",
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "tls_cert": str(certs / "server.crt"),
            "tls_key": str(certs / "server.key"),
            "tls_client_ca": str(certs / "ca.crt"),
            "tokens_file": str(certs / "tokens.txt"),
            "metrics_port": 0,
            "linger_seconds": 2,
        },
    }
    path = tmp / "fed.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _check_dashboard_series_are_exposed(port: int) -> None:
    """Every gradcomp series the dashboard and rules query is on the live coordinator's /metrics
    (labelled families with no child yet, e.g. RPCs before the first RPC, excepted)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    live = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    exported = _exported()
    for where, expr in _exprs():
        for name, _ in SELECTOR.findall(expr):
            if name.startswith("gradcomp_") and name not in live:
                _family, labels = exported[name]
                assert labels - {"le"}, f"{where}: {name} is not on the coordinator's /metrics"


def _gradcomp() -> list[str]:
    return [sys.executable, "-m", "gradcomp.cli"]


@pytest.mark.slow
def test_certs_and_tokens_work_with_the_real_coordinator_and_client(certs: Path, tmp_path: Path) -> None:
    """The k8s wiring on one machine: `gradcomp serve` with the server cert, client CA and tokens
    file; the probe passes mutual TLS with the server's own cert (as in the pod) and fails without
    a client cert; `gradcomp client` with its cert and $GRADCOMP_TOKEN finishes the job."""
    job = _fed_job(certs, tmp_path)
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("GRADCOMP_TOKEN", None)
    server = subprocess.Popen(
        [*_gradcomp(), "serve", "--config", str(job), "--runs-dir", str(runs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        endpoint = runs / "tls-check" / "endpoint.json"
        deadline = time.monotonic() + 90
        while not endpoint.is_file():
            assert server.poll() is None, f"gradcomp serve exited: {server.stdout.read() if server.stdout else ''}"
            assert time.monotonic() < deadline, "gradcomp serve did not start in 90 s"
            time.sleep(0.2)
        info = json.loads(endpoint.read_text())
        assert info["tls"] is True
        address = f"127.0.0.1:{info['port']}"
        probe = [sys.executable, str(HEALTHCHECK), "--address", address, "--tls-ca", str(certs / "ca.crt")]
        pod_probe = subprocess.run(
            [*probe, "--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert pod_probe.returncode == 0 and "SERVING" in pod_probe.stdout, pod_probe.stdout + pod_probe.stderr
        no_cert = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        assert no_cert.returncode == 1, "mutual TLS must refuse a caller without a client certificate"
        _check_dashboard_series_are_exposed(info["metrics_port"])
        plaintext = subprocess.run(
            [sys.executable, str(HEALTHCHECK), "--address", address, "--timeout", "2"], capture_output=True, timeout=60
        )
        assert plaintext.returncode == 1, "a plaintext probe (the kubelet's grpc probe) cannot reach a TLS server"

        client_env = {**env, "GRADCOMP_TOKEN": (certs / "client-0.token").read_text()}
        client = subprocess.run(
            [
                *_gradcomp(),
                "client",
                "--server",
                f"localhost:{info['port']}",
                "--client-id",
                "client-0",
                "--tls-ca",
                str(certs / "ca.crt"),
                "--tls-cert",
                str(certs / "client-0.crt"),
                "--tls-key",
                str(certs / "client-0.key"),
            ],
            capture_output=True,
            text=True,
            env=client_env,
            timeout=180,
        )
        assert client.returncode == 0, client.stdout[-2000:] + client.stderr[-2000:]
        out, _ = server.communicate(timeout=120)
        assert server.returncode == 0, out[-3000:]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    results = json.loads((runs / "tls-check" / "results.json").read_text())
    assert results["final"]["rounds"] == 1 and results["bytes_sent"] > 0
