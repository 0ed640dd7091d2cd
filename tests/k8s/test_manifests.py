"""k8s/: every YAML parses, every object validates against the real schemas (KubeRay and
prometheus-operator CRDs, Kubernetes core kinds), a broken copy fails, and the deployment policy holds."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the dev extra installs tomli there)
    import tomli as tomllib
import yaml

from tests.k8s.manifests import (
    CRD_SKIP_REASON,
    K8S_DIR,
    REPO_ROOT,
    Manifest,
    containers,
    crd_schemas,
    dashboard,
    generated_configmaps,
    have_crd_schemas,
    is_crd_kind,
    literal_secret_hits,
    load_manifests,
    policy_violations,
    validate_object,
    validate_tree,
    yaml_files,
)

BASE = K8S_DIR / "base"
OVERLAY = K8S_DIR / "overlays" / "example"
# KubeRay / prometheus-operator kinds need the CRD schema folder ($SOHO_CRD_SCHEMAS, see
# tests/k8s/manifests.py).
needs_crd_schemas = pytest.mark.skipif(not have_crd_schemas(), reason=CRD_SKIP_REASON)


def _one(manifests: list[Manifest], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [m.doc for m in manifests if m.kind == kind and (name is None or m.name == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _apply_json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """The `replace`/`add` subset of RFC 6902 that the example overlay uses."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        parent: Any = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if op["op"] == "replace":
            if isinstance(parent, list):
                parent[int(last)] = op["value"]
            else:
                assert last in parent, f"replace of missing {op['path']}"
                parent[last] = op["value"]
        elif op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), op["value"])
            else:
                parent[last] = op["value"]
        else:
            raise AssertionError(f"unsupported op {op['op']}")
    return doc


def _overlay_rayjob() -> tuple[dict[str, Any], dict[str, str]]:
    """The example overlay's RayJob and settings, patched by our reading of its kustomization."""
    kz = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    rayjob = _one(load_manifests(BASE), "RayJob")
    for patch in kz["patches"]:
        if patch["target"]["kind"] == "RayJob":
            rayjob = _apply_json6902(rayjob, yaml.safe_load(patch["patch"]))
    settings = {
        cm["metadata"]["name"]: cm["data"] for cm in generated_configmaps(BASE / "kustomization.yaml")
    }["soho-settings"]
    overlay_settings = {
        cm["metadata"]["name"]: cm["data"] for cm in generated_configmaps(OVERLAY / "kustomization.yaml")
    }
    settings = {**settings, **overlay_settings["soho-settings"]}
    return rayjob, settings


def _base_settings() -> dict[str, str]:
    return {cm["metadata"]["name"]: cm["data"] for cm in generated_configmaps(BASE / "kustomization.yaml")}[
        "soho-settings"
    ]


# --- parsing and schemas -----------------------------------------------------------------------


def test_every_yaml_parses_and_the_expected_objects_exist() -> None:
    files = yaml_files()
    assert len(files) >= 10
    for path in files:
        with path.open() as fh:
            docs = [d for d in yaml.safe_load_all(fh) if d is not None]
        assert docs, f"{path} is empty"
    kinds: dict[str, int] = {}
    for m in load_manifests():
        kinds[m.kind] = kinds.get(m.kind, 0) + 1
    assert kinds == {
        "Kustomization": 2,
        "Component": 1,
        "ServiceAccount": 1,
        "NetworkPolicy": 3,
        "RayJob": 1,
        "RayCluster": 1,
        "Job": 1,
        "PodMonitor": 2,
        "PrometheusRule": 1,
    }


def test_every_core_object_validates_against_kubernetes_schemas() -> None:
    """Runs without the CRD schema folder: kubernetes-validate ships the core kinds' schemas."""
    assert validate_tree(crd_kinds=False) == {}
    core = [m for m in load_manifests()
            if m.kind not in ("Kustomization", "Component") and not is_crd_kind(m.doc)]
    assert sorted(m.kind for m in core) == ["Job", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy",
                                            "ServiceAccount"]
    assert {m.doc["apiVersion"] for m in core} == {"v1", "batch/v1", "networking.k8s.io/v1"}


@needs_crd_schemas
def test_every_object_validates_against_crd_and_core_schemas() -> None:
    schemas = crd_schemas()
    assert ("ray.io", "v1", "RayJob") in schemas and ("monitoring.coreos.com", "v1", "PodMonitor") in schemas
    assert validate_tree() == {}
    validated = [m for m in load_manifests() if m.kind not in ("Kustomization", "Component")]
    groups = {m.doc["apiVersion"] for m in validated}
    assert groups == {"ray.io/v1", "monitoring.coreos.com/v1", "v1", "batch/v1", "networking.k8s.io/v1"}


@pytest.mark.parametrize("kustomization", [BASE / "kustomization.yaml", OVERLAY / "kustomization.yaml"])
def test_generated_configmaps_validate(kustomization: Path) -> None:
    cms = generated_configmaps(kustomization)
    assert cms
    for cm in cms:
        assert validate_object(cm) == [], cm["metadata"]["name"]


def test_grafana_dashboard_configmap_is_labelled_for_the_sidecar() -> None:
    cms = {cm["metadata"]["name"]: cm for cm in generated_configmaps(BASE / "kustomization.yaml")}
    cm = cms["soho-grafana-dashboard"]
    assert cm["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert dashboard()["uid"] == "soho-training"
    assert '"uid": "soho-training"' in cm["data"]["soho-training.json"]


def _break(root: Path, rel: str, mutate) -> None:  # noqa: ANN001 - a test helper taking a lambda
    path = root / rel
    docs = list(yaml.safe_load_all(path.read_text()))
    mutate(docs)
    path.write_text(yaml.safe_dump_all(docs))


def _break_core_kinds(root: Path) -> None:
    def job_typo(docs: list[dict]) -> None:
        docs[0]["spec"]["completion"] = docs[0]["spec"].pop("completions")

    def bad_name(docs: list[dict]) -> None:
        docs[0]["metadata"]["name"] = "Soho_Train"

    _break(root, "base/shard-job.yaml", job_typo)
    _break(root, "base/serviceaccount.yaml", bad_name)


def test_core_validation_fails_on_a_deliberately_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, broken)
    _break_core_kinds(broken)
    flat = {k: " | ".join(v) for k, v in validate_tree(broken, crd_kinds=False).items()}
    assert set(flat) == {"base/shard-job.yaml#0", "base/serviceaccount.yaml#0"}
    assert "completion" in flat["base/shard-job.yaml#0"]
    assert "Soho_Train" in flat["base/serviceaccount.yaml#0"]


@needs_crd_schemas
def test_validation_fails_on_a_deliberately_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, broken)
    wg = lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]  # noqa: E731

    def typo_min_replicas(docs: list[dict]) -> None:
        wg(docs[0])["minReplica"] = wg(docs[0]).pop("minReplicas")

    def replicas_as_text(docs: list[dict]) -> None:
        docs[0]["spec"]["workerGroupSpecs"][0]["replicas"] = "two"

    def podmonitor_typo(docs: list[dict]) -> None:
        docs[0]["spec"]["podMetricEndpoints"] = docs[0]["spec"].pop("podMetricsEndpoints")

    def rule_without_expr(docs: list[dict]) -> None:
        del docs[0]["spec"]["groups"][0]["rules"][0]["expr"]

    _break(broken, "base/rayjob.yaml", typo_min_replicas)
    _break(broken, "base/raycluster.yaml", replicas_as_text)
    _break(broken, "base/monitoring/podmonitor.yaml", podmonitor_typo)
    _break(broken, "base/monitoring/prometheusrule.yaml", rule_without_expr)
    _break_core_kinds(broken)
    errors = validate_tree(broken)
    flat = {k: " | ".join(v) for k, v in errors.items()}
    assert set(flat) == {
        "base/rayjob.yaml#0",
        "base/raycluster.yaml#0",
        "base/monitoring/podmonitor.yaml#0",
        "base/monitoring/prometheusrule.yaml#0",
        "base/shard-job.yaml#0",
        "base/serviceaccount.yaml#0",
    }
    assert "minReplica" in flat["base/rayjob.yaml#0"]
    assert "'minReplicas' is a required property" in flat["base/rayjob.yaml#0"]
    assert "spec.workerGroupSpecs.0.replicas" in flat["base/raycluster.yaml#0"]
    assert "podMetricEndpoints" in flat["base/monitoring/podmonitor.yaml#0"]
    assert "'expr' is a required property" in flat["base/monitoring/prometheusrule.yaml#0"]
    assert "completion" in flat["base/shard-job.yaml#0"]
    assert "Soho_Train" in flat["base/serviceaccount.yaml#0"]


def test_kustomizations_list_every_manifest() -> None:
    kz = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    listed = {BASE / r for r in kz["resources"]}
    objects = {m.path for m in load_manifests(BASE) if m.kind != "Kustomization"}
    assert listed == objects
    for conf in kz["configurations"]:
        assert (BASE / conf).is_file()
    okz = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert okz["resources"] == ["../../base"]
    assert okz["namespace"] and okz["namePrefix"]
    assert [g["behavior"] for g in okz["configMapGenerator"]] == ["merge"]


# --- policy --------------------------------------------------------------------------------------


def test_policy_holds_for_every_container() -> None:
    manifests = load_manifests()
    assert policy_violations(manifests) == []
    assert literal_secret_hits() == []
    all_containers = [c for m in manifests for _, _, c in containers(m.doc)]
    # head + worker for RayJob and RayCluster, RayJob submitter, shard Job.
    assert len(all_containers) == 6
    for c in all_containers:
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "valueFrom" in e
        }
        assert (
            refs
            == {
                "AWS_ACCESS_KEY_ID": "soho-s3-credentials",
                "AWS_SECRET_ACCESS_KEY": "soho-s3-credentials",
                "AWS_SESSION_TOKEN": "soho-s3-credentials",
            }
            or c["name"] == "ray-job-submitter"
        ), c["name"]


def test_policy_catches_violations_in_a_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, broken)

    def literal_secret_and_gpu_mismatch(docs: list[dict]) -> None:
        worker = docs[0]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
        c = worker["containers"][0]
        c["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "plain-text"})
        c["resources"]["limits"]["nvidia.com/gpu"] = 2
        c["securityContext"]["privileged"] = True
        worker["tolerations"] = []
        head = docs[0]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        del head["securityContext"]["runAsNonRoot"]
        del head["containers"][0]["resources"]["requests"]["memory"]

    _break(broken, "base/rayjob.yaml", literal_secret_and_gpu_mismatch)
    (broken / "base" / "secret.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s3}\n"
        "stringData: {AWS_ACCESS_KEY_ID: AKIAABCDEFGHIJKLMNOP}\n"
    )
    violations = "\n".join(policy_violations(load_manifests(broken), broken))
    assert "env AWS_SECRET_ACCESS_KEY has a literal value" in violations
    assert "nvidia.com/gpu requests 1 != limits 2" in violations
    assert "privileged: false" in violations
    assert "without a nvidia.com/gpu toleration" in violations
    assert "runAsNonRoot" in violations and "ray-head" in violations
    assert "no memory request" in violations
    assert "Secret with literal data" in violations
    assert literal_secret_hits(broken) == ["base/secret.yaml: AKIAABCDEFGHIJKLMNOP"]


def test_rayjob_retries_cleans_up_and_authenticates() -> None:
    manifests = load_manifests(BASE)
    rayjob = _one(manifests, "RayJob")
    spec = rayjob["spec"]
    assert spec["backoffLimit"] >= 1
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    for cluster in (spec["rayClusterSpec"], _one(manifests, "RayCluster")["spec"]):
        assert cluster["authOptions"] == {"mode": "token"}
        head = cluster["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
        assert head["rayStartParams"]["num-gpus"] == "0"
        head_res = head["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in head_res["requests"] and "nvidia.com/gpu" not in head_res["limits"]
        for wg in cluster["workerGroupSpecs"]:
            assert wg["minReplicas"] <= wg["replicas"] <= wg["maxReplicas"]
            assert wg["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    # No object exposes Ray's ports outside the cluster.
    kinds = {m.kind for m in load_manifests()}
    assert "Service" not in kinds and "Ingress" not in kinds
    policy = _one(manifests, "NetworkPolicy", "soho-ray-ingress")
    monitoring_ports = {p["port"] for p in policy["spec"]["ingress"][1]["ports"]}
    assert monitoring_ports == {9450, 8080} and 8265 not in monitoring_ports


def _world(rayjob: dict[str, Any]) -> tuple[int, int, list[dict[str, Any]]]:
    wg = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    c = wg["template"]["spec"]["containers"][0]
    return wg["replicas"], c["resources"]["limits"]["nvidia.com/gpu"], c["ports"]


@pytest.mark.parametrize("variant", ["base", "overlay"])
def test_world_size_and_metrics_ports_agree_with_gpu_count(variant: str) -> None:
    if variant == "base":
        rayjob, settings = _one(load_manifests(BASE), "RayJob"), _base_settings()
    else:
        rayjob, settings = _overlay_rayjob()
    replicas, gpus, ports = _world(rayjob)
    wg = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert wg["minReplicas"] == wg["maxReplicas"] == replicas  # fixed world size for a training run
    assert int(settings["SOHO_NUM_WORKERS"]) == replicas * gpus
    soho_ports = sorted(
        (p["name"], p["containerPort"]) for p in ports if p["name"].startswith("soho-metrics-")
    )
    assert soho_ports == [(f"soho-metrics-{i}", 9450 + i) for i in range(gpus)]
    requests = wg["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert requests["nvidia.com/gpu"] == gpus
    if variant == "overlay":
        assert (replicas, gpus) == (2, 2)
        assert settings["SOHO_STORAGE_PATH"].startswith("s3://team-a-soho/")


def test_podmonitors_select_the_metrics_ports() -> None:
    manifests = load_manifests(BASE)
    train = _one(manifests, "PodMonitor", "soho-train")
    ray = _one(manifests, "PodMonitor", "soho-ray")
    keep = [r for r in train["spec"]["podMetricsEndpoints"][0]["relabelings"] if r.get("action") == "keep"]
    regex = re.compile(f"^(?:{keep[0]['regex']})$")  # Prometheus regexes are anchored
    for kind in ("RayJob", "RayCluster"):
        obj = _one(manifests, kind)
        for path, _, c in containers(obj):
            names = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            if "gpu" in path or "workerGroupSpecs" in path:
                assert any(regex.match(n) for n in names), f"{kind} {path}: no soho metrics port"
            if c["name"] != "ray-job-submitter":
                assert names.get("metrics") == 8080, f"{kind} {path}: Ray metrics port"
            assert not any(regex.match(n) for n in names if not n.startswith("soho-metrics-"))
        for labels in _pod_template_labels(obj):
            for sel in (train, ray):
                assert sel["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert ray["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def _pod_template_labels(obj: dict[str, Any]) -> list[dict[str, str]]:
    spec = obj["spec"].get("rayClusterSpec", obj["spec"])
    templates = [spec["headGroupSpec"]["template"]] + [wg["template"] for wg in spec["workerGroupSpecs"]]
    return [t["metadata"]["labels"] for t in templates]


# --- entrypoints against the real CLIs ------------------------------------------------------------


def _help(*module_args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", *module_args, "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"`python -m {' '.join(module_args)} --help` failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


def _flags(tokens: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in tokens if t.startswith("--")]


def _accepted(flag: str, help_text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def test_rayjob_entrypoint_and_run_config_use_flags_of_soho_train() -> None:
    rayjob = _one(load_manifests(BASE), "RayJob")
    tokens = shlex.split(rayjob["spec"]["entrypoint"])
    assert tokens[:3] == ["python", "-m", "soho.train"]
    flags = _flags(tokens)
    assert {"--config", "--run-name", "--storage-path", "--data", "--num-workers"} <= set(flags)
    run_config = yaml.safe_load((BASE / "run.yaml").read_text())
    config_flags = ["--" + key.replace("_", "-") for key in run_config]
    help_text = _help("soho.train")
    unknown = [f for f in flags + config_flags if not _accepted(f, help_text)]
    assert unknown == [], f"not accepted by `python -m soho.train --help`: {unknown}"
    # The config file the entrypoint names is the one the head mounts from the run-config ConfigMap.
    config_path = tokens[tokens.index("--config") + 1]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(vm for vm in head["containers"][0]["volumeMounts"] if vm["name"] == "run-config")
    assert config_path == f"{mount['mountPath']}/run.yaml"
    # Every $VAR the entrypoint expands is provided by the soho-settings ConfigMap.
    used = set(re.findall(r"\$(\w+)", rayjob["spec"]["entrypoint"]))
    assert used and used <= set(_base_settings())


def test_shard_job_is_indexed_and_uses_flags_of_data_pipeline_shard() -> None:
    job = _one(load_manifests(BASE), "Job", "soho-shard")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] >= 2
    c = spec["template"]["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "data_pipeline", "shard"]
    args = c["args"]
    assert args[args.index("--num-jobs") + 1] == str(spec["completions"])
    assert args[args.index("--job-index") + 1] == "$(JOB_COMPLETION_INDEX)"
    used = set(re.findall(r"\$\((\w+)\)", " ".join(args))) - {"JOB_COMPLETION_INDEX"}
    assert used and used <= set(_base_settings())
    help_text = _help("data_pipeline", "shard")
    unknown = [f for f in _flags(args) if not _accepted(f, help_text)]
    assert unknown == [], f"not accepted by `python -m data_pipeline shard --help`: {unknown}"


def test_images_come_from_the_dockerfile() -> None:
    dockerfile = (K8S_DIR / "Dockerfile").read_text()
    images = {c["image"] for m in load_manifests() for _, _, c in containers(m.doc)}
    assert images == {"soho-train:0.1.0"}
    okz = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert [i["name"] for i in okz["images"]] == ["soho-train"]
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0] == "1000"
    copied = set()
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", dockerfile, re.M):
        for item in src.split():
            assert (REPO_ROOT / item).exists(), f"Dockerfile copies missing {item}"
            copied.add(item)
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"the image would install without {sorted(packages - copied)}"
    ray_tag = re.search(r"rayproject/ray:(\d+\.\d+\.\d+)", dockerfile).group(1)
    ray_versions = {
        m.doc["spec"].get("rayClusterSpec", m.doc["spec"])["rayVersion"]
        for m in load_manifests()
        if m.kind in ("RayJob", "RayCluster")
    }
    assert ray_versions == {ray_tag}


# --- a real kustomize build where kubectl is installed -------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")
@pytest.mark.parametrize("target", ["base", "overlays/example"])
def test_kustomize_build_validates_and_resolves_references(target: str) -> None:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(K8S_DIR / target)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    crds = have_crd_schemas()  # without the CRD folder the references below are still checked
    for doc in docs:
        if crds or not is_crd_kind(doc):
            assert validate_object(doc) == [], f"{doc['kind']}/{doc['metadata']['name']}"
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    prefix = "team-a-" if target != "base" else ""
    refs = 0
    for doc in docs:
        for _, spec, c in containers(doc):
            assert spec["serviceAccountName"] in accounts
            for ef in c.get("envFrom", []):
                assert ef["configMapRef"]["name"] in configmaps
                refs += 1
            for v in spec.get("volumes", []):
                if "configMap" in v:
                    assert v["configMap"]["name"] in configmaps
            assert c["image"] == (
                "soho-train:0.1.0" if not prefix else "registry.example.com/ml/soho-train:0.1.0"
            )
    assert refs == 6
    assert f"{prefix}soho-grafana-dashboard" in configmaps
    if prefix:
        assert all(d["metadata"]["name"].startswith(prefix) for d in docs)
        assert all(d["metadata"]["namespace"] == "soho" for d in docs)
        rayjob = next(d for d in docs if d["kind"] == "RayJob")
        assert _world(rayjob)[:2] == (2, 2)
