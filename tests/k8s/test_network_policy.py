"""k8s NetworkPolicies, asked as connections: the KubeRay operator reaches the head's dashboard port (and
nothing else), Prometheus only the metrics ports, nobody else from outside the namespace; the egress overlay
allows DNS over UDP and TCP, the object store and the namespace's own pods, and drops the rest."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.manifests import (
    K8S_DIR,
    connection_allowed,
    containers,
    external,
    load_manifests,
    pod,
    validate_object,
)

BASE = K8S_DIR / "base"
OVERLAY = K8S_DIR / "overlays" / "example"
EGRESS = K8S_DIR / "overlays" / "egress"
PART_OF = {"app.kubernetes.io/part-of": "soho-at-scale"}
# Labels KubeRay puts on the pods it creates, over the template's own.
HEAD = pod("soho", {**PART_OF, "app.kubernetes.io/component": "ray-head", "ray.io/node-type": "head"})
WORKER = pod("soho", {**PART_OF, "app.kubernetes.io/component": "ray-gpu-worker",
                      "ray.io/node-type": "worker"})
SUBMITTER = pod("soho", {**PART_OF, "app.kubernetes.io/component": "submitter"})
OPERATOR = {"app.kubernetes.io/component": "kuberay-operator", "app.kubernetes.io/name": "kuberay-operator"}
PROMETHEUS = pod("monitoring", {"app.kubernetes.io/name": "prometheus"})


def _policies(root: Path) -> list[dict[str, Any]]:
    return [m.doc for m in load_manifests(root) if m.kind == "NetworkPolicy"]


def _overlay_policies() -> list[dict[str, Any]]:
    """The base policies with the example overlay's NetworkPolicy patches applied (RFC 6902 replace)."""
    policies = copy.deepcopy(_policies(BASE))
    kz = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    patches = [p for p in kz["patches"] if p["target"]["kind"] == "NetworkPolicy"]
    assert patches
    for patch in patches:
        doc = next(d for d in policies if d["metadata"]["name"] == patch["target"]["name"])
        for op in yaml.safe_load(patch["patch"]):
            assert op["op"] == "replace"
            keys = [k.replace("~1", "/") for k in op["path"].lstrip("/").split("/")]
            parent: Any = doc
            for k in keys[:-1]:
                parent = parent[int(k)] if isinstance(parent, list) else parent[k]
            assert keys[-1] in parent
            parent[keys[-1]] = op["value"]
    return policies


def test_the_operator_namespace_reaches_the_head_dashboard_and_nothing_else() -> None:
    policies = _policies(BASE)
    operator = pod("default", OPERATOR)  # the base's default: KubeRay's Helm/kustomize install namespace
    assert connection_allowed(policies, operator, HEAD, 8265)
    for port in (6379, 10001, 52365, 8080, 9450):
        assert not connection_allowed(policies, operator, HEAD, port), port
    assert not connection_allowed(policies, operator, WORKER, 8265)
    # Another pod of the operator's namespace, or the operator's labels in another namespace: refused.
    assert not connection_allowed(policies, pod("default", {"app": "web"}), HEAD, 8265)
    assert not connection_allowed(policies, pod("team-b", OPERATOR), HEAD, 8265)
    assert not connection_allowed(policies, external("203.0.113.7"), HEAD, 8265)


def test_the_overlay_moves_the_operator_namespace() -> None:
    policies = _overlay_policies()
    assert connection_allowed(policies, pod("kuberay-system", OPERATOR), HEAD, 8265)
    assert not connection_allowed(policies, pod("default", OPERATOR), HEAD, 8265)


def test_monitoring_scrapes_only_metrics_ports_and_the_namespace_talks_freely() -> None:
    for policies in (_policies(BASE), _overlay_policies()):
        for target in (HEAD, WORKER):
            for port in (9450, 9451, 9457, 8080):
                assert connection_allowed(policies, PROMETHEUS, target, port), (target, port)
            for port in (8265, 6379, 10001, 9458):
                assert not connection_allowed(policies, PROMETHEUS, target, port), (target, port)
        assert connection_allowed(policies, SUBMITTER, HEAD, 8265)
        assert connection_allowed(policies, WORKER, HEAD, 6379)
        assert connection_allowed(policies, HEAD, WORKER, 41234)


def test_operator_rule_selects_exactly_the_head_pods_of_both_clusters() -> None:
    manifests = load_manifests(BASE)
    operator_policy = next(m.doc for m in manifests if m.name == "soho-ray-operator-ingress")
    selector = operator_policy["spec"]["podSelector"]["matchLabels"]
    assert selector == {**PART_OF, "ray.io/node-type": "head"}
    for m in manifests:
        if m.kind not in ("RayJob", "RayCluster"):
            continue
        spec = m.doc["spec"].get("rayClusterSpec", m.doc["spec"])
        assert PART_OF.items() <= spec["headGroupSpec"]["template"]["metadata"]["labels"].items()
        assert spec["headGroupSpec"]["rayStartParams"].get("dashboard-port", "8265") == "8265"
        assert "8265" not in str(spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", ""))
    heads = [c for m in manifests for path, _, c in containers(m.doc) if "headGroupSpec" in path]
    assert heads and all(any(p["containerPort"] == 8265 for p in c["ports"]) for c in heads)


def test_egress_overlay_allows_dns_the_object_store_and_the_namespace_only() -> None:
    kz = yaml.safe_load((EGRESS / "kustomization.yaml").read_text())
    assert kz["kind"] == "Component" and kz["resources"] == ["networkpolicy-egress.yaml"]
    egress = _policies(EGRESS)
    assert [p["metadata"]["name"] for p in egress] == ["soho-egress"]
    assert validate_object(egress[0]) == []
    dns_ports = {(p["protocol"], p["port"]) for r in egress[0]["spec"]["egress"] for p in r.get("ports", [])
                 if p["port"] == 53}
    assert dns_ports == {("UDP", 53), ("TCP", 53)}
    policies = _policies(BASE) + egress
    kube_dns = pod("kube-system", {"k8s-app": "kube-dns"})
    for src in (HEAD, WORKER, SUBMITTER):
        assert connection_allowed(policies, src, kube_dns, 53, "UDP")
        assert connection_allowed(policies, src, kube_dns, 53, "TCP")
        assert connection_allowed(policies, src, external("169.254.20.10"), 53, "UDP")  # NodeLocal DNSCache
        assert connection_allowed(policies, src, external("52.216.8.1"), 443)  # an S3 endpoint
        assert not connection_allowed(policies, src, external("52.216.8.1"), 80)
        assert not connection_allowed(policies, src, kube_dns, 9153)
        assert not connection_allowed(policies, src, pod("other", {"app": "db"}), 5432)
    assert connection_allowed(policies, WORKER, HEAD, 6379)
    assert connection_allowed(policies, SUBMITTER, HEAD, 8265)
    assert connection_allowed(policies, HEAD, WORKER, 29500)  # gloo/NCCL rendezvous between workers
    # Without the overlay nothing restricts egress.
    assert connection_allowed(_policies(BASE), HEAD, external("198.51.100.1"), 80)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")
def test_example_overlay_with_the_egress_component_builds(tmp_path: Path) -> None:
    """What k8s/README.md tells a team to do: add `components: [../egress]` to their copy of the example."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, tree)
    kz = tree / "overlays" / "example" / "kustomization.yaml"
    kz.write_text(kz.read_text() + "components:\n  - ../egress\n")
    proc = subprocess.run(["kubectl", "kustomize", str(kz.parent)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(proc.stdout)
            if d and d["kind"] == "NetworkPolicy"}
    assert set(docs) == {"team-a-soho-ray-ingress", "team-a-soho-ray-operator-ingress", "team-a-soho-egress"}
    assert all(d["metadata"]["namespace"] == "soho" and validate_object(d) == [] for d in docs.values())
    policies = list(docs.values())
    assert connection_allowed(policies, pod("kuberay-system", OPERATOR), HEAD, 8265)
    assert connection_allowed(policies, HEAD, pod("kube-system", {"k8s-app": "kube-dns"}), 53, "UDP")
    assert not connection_allowed(policies, HEAD, external("198.51.100.1"), 80)
