"""Loading and validating the k8s/ manifests: CRD schemas (jsonschema), core kinds (kubernetes-validate),
and the policy rules of the deployment. Shared by tests/k8s and tests/monitoring.

Core Kubernetes kinds are always validated (kubernetes-validate ships their schemas). The KubeRay and
prometheus-operator CRD schemas are not part of this repository: they are read from the folder named by
``$SOHO_CRD_SCHEMAS`` or, when that is unset, from ``shared/schemas`` in the folder that holds the
repository (where CI lays them). Without either, the tests that need them are skipped with
:data:`CRD_SKIP_REASON`.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
KUBERNETES_VERSION = "1.37.0"
CRD_FILES = {
    "ray.io": ["kuberay/ray.io_rayjobs.yaml", "kuberay/ray.io_rayclusters.yaml"],
    "monitoring.coreos.com": [
        "prometheus-operator/monitoring.coreos.com_podmonitors.yaml",
        "prometheus-operator/monitoring.coreos.com_prometheusrules.yaml",
        "prometheus-operator/monitoring.coreos.com_servicemonitors.yaml",
    ],
}
CRD_SCHEMAS_ENV = "SOHO_CRD_SCHEMAS"
# The folder CI lays beside the clone (used when $SOHO_CRD_SCHEMAS is unset and it exists).
DEFAULT_SCHEMAS_DIR = REPO_ROOT.parent / "shared" / "schemas"
CRD_SKIP_REASON = (
    f"KubeRay / prometheus-operator CRD schemas not found: set ${CRD_SCHEMAS_ENV} to a folder holding "
    + ", ".join(rel for files in CRD_FILES.values() for rel in files)
    + " (KubeRay's ray-operator/config/crd/bases/, prometheus-operator's example/prometheus-operator-crd/), "
    f"or put them in {DEFAULT_SCHEMAS_DIR}"
)


class CRDSchemasMissing(FileNotFoundError):
    """No CRD schema folder is configured; tests turn this into a skip with CRD_SKIP_REASON."""


def crd_schemas_dir() -> Path | None:
    """The CRD schema folder: ``$SOHO_CRD_SCHEMAS`` when set (it must then exist and hold every file of
    CRD_FILES), else ``shared/schemas`` beside the repository when it exists, else None."""
    configured = os.environ.get(CRD_SCHEMAS_ENV)
    if configured:
        folder = Path(configured).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"${CRD_SCHEMAS_ENV}={configured}: no such folder")
    elif DEFAULT_SCHEMAS_DIR.is_dir():
        folder = DEFAULT_SCHEMAS_DIR
    else:
        return None
    missing = [rel for files in CRD_FILES.values() for rel in files if not (folder / rel).is_file()]
    if missing:
        source = f"${CRD_SCHEMAS_ENV}={configured}" if configured else str(folder)
        raise FileNotFoundError(f"CRD schema folder {source} lacks {', '.join(missing)}")
    return folder


def have_crd_schemas() -> bool:
    return crd_schemas_dir() is not None
# Files in k8s/ that are YAML but not Kubernetes objects (kustomize's own files, the run config).
NON_OBJECT_YAML = {"kustomizeconfig.yaml", "run.yaml"}
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class Manifest:
    path: Path
    index: int
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.doc.get("kind", "")

    @property
    def name(self) -> str:
        return self.doc.get("metadata", {}).get("name", "")


def yaml_files(root: Path = K8S_DIR) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())


def load_manifests(root: Path = K8S_DIR) -> list[Manifest]:
    """Every Kubernetes object document under root (kustomization files included, kind Kustomization)."""
    out: list[Manifest] = []
    for path in yaml_files(root):
        if path.name in NON_OBJECT_YAML:
            continue
        with path.open() as fh:
            for i, doc in enumerate(yaml.safe_load_all(fh)):
                if doc is not None:
                    out.append(Manifest(path, i, doc))
    return out


def _strict(schema: Any) -> Any:
    """Reject unknown fields like the API server's strict field validation (a typo such as
    `minReplica` must fail): objects with declared properties get additionalProperties: false."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_CRD_CACHE: dict[tuple[str, str, str], dict[str, Any]] = {}


def crd_schemas() -> dict[tuple[str, str, str], dict[str, Any]]:
    """{(group, version, kind): strict openAPIV3Schema} from the CRDs in crd_schemas_dir()."""
    if _CRD_CACHE:
        return _CRD_CACHE
    schemas_dir = crd_schemas_dir()
    if schemas_dir is None:
        raise CRDSchemasMissing(CRD_SKIP_REASON)
    for group, files in CRD_FILES.items():
        for rel in files:
            # The KubeRay CRDs are ~1 MB each: the C loader reads them ~15x faster than pure Python.
            crd = yaml.load((schemas_dir / rel).read_text(), Loader=_YAML_LOADER)
            assert crd["spec"]["group"] == group, rel
            kind = crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if not version.get("served", True):
                    continue
                schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                # metadata is `type: object` in every CRD; name rules are checked separately.
                _CRD_CACHE[(group, version["name"], kind)] = _strict(schema)
    return _CRD_CACHE


def is_crd_kind(doc: dict[str, Any]) -> bool:
    """Whether the object's schema comes from a CRD file (KubeRay, prometheus-operator)."""
    return doc.get("apiVersion", "").rpartition("/")[0] in CRD_FILES


def validate_object(doc: dict[str, Any]) -> list[str]:
    """Schema errors of one Kubernetes object ([] when valid). Raises CRDSchemasMissing for a CRD kind
    when no CRD schema folder is configured."""
    api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    if not api_version or not kind:
        return ["missing apiVersion or kind"]
    group, _, version = api_version.rpartition("/")
    if group == "kustomize.config.k8s.io":
        return []
    errors: list[str] = []
    name = doc.get("metadata", {}).get("name", "")
    if not DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
        errors.append(f"metadata.name {name!r} is not a DNS-1123 subdomain")
    if group in CRD_FILES:
        schema = crd_schemas().get((group, version, kind))
        if schema is None:
            return errors + [f"no CRD schema for {api_version} {kind}"]
        validator = jsonschema.Draft7Validator(schema)
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in err.absolute_path)
            errors.append(f"{path}: {err.message}")
        return errors
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        errors.append(f"{path}: {err.message}")
    except kubernetes_validate.SchemaNotFoundError:
        errors.append(f"no schema for {api_version} {kind} (not a core kind, no CRD in CRD_FILES)")
    return errors


def validate_tree(root: Path = K8S_DIR, crd_kinds: bool = True) -> dict[str, list[str]]:
    """{file#doc: errors} for every object under root that does not validate; with crd_kinds=False only the
    core kinds (and kustomize's own files) are validated."""
    bad: dict[str, list[str]] = {}
    for m in load_manifests(root):
        if not crd_kinds and is_crd_kind(m.doc):
            continue
        errs = validate_object(m.doc)
        if errs:
            bad[f"{m.path.relative_to(root)}#{m.index}"] = errs
    return bad


# --- pod templates and containers ---------------------------------------------------------------


def pod_specs(obj: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec (a mapping with `containers`) anywhere inside an object, with its path."""
    if isinstance(obj, dict):
        if isinstance(obj.get("containers"), list):
            yield path, obj
        for key, value in obj.items():
            yield from pod_specs(value, f"{path}.{key}" if path else key)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from pod_specs(value, f"{path}[{i}]")


def containers(obj: Any) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(path, pod spec, container) for every container and init container."""
    for path, spec in pod_specs(obj):
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            yield f"{path}/{c.get('name')}", spec, c


SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|API_KEY|PRIVATE)", re.I)
SECRET_VALUE_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)(aws_secret_access_key|password|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{16,}"),
]


def policy_violations(manifests: list[Manifest], root: Path = K8S_DIR) -> list[str]:
    """Deployment policy: no literal secrets, non-root unprivileged containers, GPU requests = limits
    with a GPU toleration and a memory-backed /dev/shm, CPU/memory requests everywhere."""
    out: list[str] = []
    for m in manifests:
        where = f"{m.path.relative_to(root)}#{m.index} {m.kind}/{m.name}"
        if m.kind == "Secret" and (m.doc.get("data") or m.doc.get("stringData")):
            out.append(f"{where}: Secret with literal data; reference an existing Secret instead")
        if m.kind == "Kustomization":
            for gen in m.doc.get("secretGenerator", []):
                out.append(
                    f"{where}: secretGenerator {gen.get('name')!r} puts secret values in the repository"
                )
            for gen in m.doc.get("configMapGenerator", []):
                for lit in gen.get("literals", []):
                    if SECRET_NAME.search(lit.split("=", 1)[0]):
                        out.append(f"{where}: ConfigMap literal {lit.split('=', 1)[0]} looks like a secret")
        for cpath, spec, c in containers(m.doc):
            cw = f"{where} {cpath}"
            for env in c.get("env", []):
                if SECRET_NAME.search(env.get("name", "")) and "value" in env:
                    out.append(f"{cw}: env {env['name']} has a literal value; use valueFrom.secretKeyRef")
            psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
            run_as_non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
            run_as_user = csc.get("runAsUser", psc.get("runAsUser"))
            if run_as_non_root is not True or run_as_user in (None, 0):
                out.append(f"{cw}: must set runAsNonRoot: true and a non-zero runAsUser")
            if csc.get("privileged") is not False:
                out.append(f"{cw}: must set securityContext.privileged: false")
            if csc.get("allowPrivilegeEscalation") is not False:
                out.append(f"{cw}: must set securityContext.allowPrivilegeEscalation: false")
            if "ALL" not in csc.get("capabilities", {}).get("drop", []):
                out.append(f"{cw}: must drop ALL capabilities")
            res = c.get("resources", {})
            req, lim = res.get("requests", {}), res.get("limits", {})
            for r in ("cpu", "memory"):
                if r not in req:
                    out.append(f"{cw}: no {r} request")
            gpu_req, gpu_lim = req.get("nvidia.com/gpu"), lim.get("nvidia.com/gpu")
            if gpu_req is not None or gpu_lim is not None:
                if gpu_req != gpu_lim:
                    out.append(f"{cw}: nvidia.com/gpu requests {gpu_req} != limits {gpu_lim}")
                tolerations = spec.get("tolerations", [])
                if not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
                    out.append(f"{cw}: GPU pod without a nvidia.com/gpu toleration")
                shm_volumes = {
                    v["name"]
                    for v in spec.get("volumes", [])
                    if v.get("emptyDir", {}).get("medium") == "Memory"
                }
                if not any(
                    vm.get("mountPath") == "/dev/shm" and vm.get("name") in shm_volumes
                    for vm in c.get("volumeMounts", [])
                ):
                    out.append(f"{cw}: GPU container without a memory-backed /dev/shm emptyDir")
    return out


def literal_secret_hits(root: Path = K8S_DIR) -> list[str]:
    """Secret-looking literal values anywhere in k8s/ (any file type)."""
    hits: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        text = path.read_text(errors="replace")
        for pattern in SECRET_VALUE_PATTERNS:
            for match in pattern.finditer(text):
                hits.append(f"{path.relative_to(root)}: {match.group(0)[:40]}")
    return hits


def generated_configmaps(kustomization: Path) -> list[dict[str, Any]]:
    """The ConfigMaps a kustomization's configMapGenerator makes (names without hash suffix)."""
    kz = yaml.safe_load(kustomization.read_text())
    out = []
    for gen in kz.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for lit in gen.get("literals", []):
            key, value = lit.split("=", 1)
            data[key] = value
        for f in gen.get("files", []):
            key, _, rel = f.rpartition("=")
            path = kustomization.parent / rel
            data[key or path.name] = path.read_text()
        options = gen.get("options", {})
        meta: dict[str, Any] = {"name": gen["name"]}
        if options.get("labels"):
            meta["labels"] = dict(options["labels"])
        if options.get("annotations"):
            meta["annotations"] = dict(options["annotations"])
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return out


def dashboard(path: Path | None = None) -> dict[str, Any]:
    path = path or K8S_DIR / "base" / "monitoring" / "dashboards" / "soho-training.json"
    return json.loads(path.read_text())


# --- NetworkPolicy semantics (enough of them to ask "is this connection allowed?") ----------------------


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    assert not (selector or {}).get("matchExpressions"), "matchExpressions: not modelled"
    return (selector or {}).get("matchLabels", {}).items() <= labels.items()


@dataclass(frozen=True)
class Endpoint:
    """One end of a connection: a pod (namespace + labels) or an address outside the cluster (ip)."""

    namespace: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    ip: str | None = None

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


def pod(namespace: str, labels: dict[str, str] | None = None) -> Endpoint:
    return Endpoint(namespace, tuple(sorted((labels or {}).items())))


def external(ip: str) -> Endpoint:
    return Endpoint(ip=ip)


def _peer_matches(peer: dict[str, Any], other: Endpoint, policy_namespace: str) -> bool:
    import ipaddress

    if "ipBlock" in peer:
        if other.ip is None:
            return False
        addr = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return addr in ipaddress.ip_network(block["cidr"]) and not any(
            addr in ipaddress.ip_network(e) for e in block.get("except", []))
    if other.namespace is None:
        return False
    ns_labels = {"kubernetes.io/metadata.name": other.namespace}
    if "namespaceSelector" in peer:
        ns_ok = _selects(peer["namespaceSelector"], ns_labels)
    else:
        ns_ok = other.namespace == policy_namespace
    return ns_ok and _selects(peer.get("podSelector"), other.label_dict)


def _port_matches(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    return any(p.get("protocol", "TCP") == protocol and p["port"] <= port <= p.get("endPort", p["port"])
               for p in ports)


def connection_allowed(policies: list[dict[str, Any]], src: Endpoint, dst: Endpoint, port: int,
                       protocol: str = "TCP", namespace: str = "soho") -> bool:
    """Whether the policies (all in ``namespace``) let ``src`` open ``port`` on ``dst``: the destination's
    ingress and the source's egress must both allow it (a side no policy selects allows everything)."""
    def side(direction: str, target: Endpoint, other: Endpoint) -> bool:
        if target.namespace != namespace:
            return True
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        relevant = [p for p in policies if direction in p["spec"].get("policyTypes", ["Ingress"])
                    and _selects(p["spec"]["podSelector"], target.label_dict)]
        if not relevant:
            return True
        return any((not rule.get(peers_key) or any(_peer_matches(peer, other, namespace)
                                                   for peer in rule[peers_key]))
                   and _port_matches(rule.get("ports"), port, protocol)
                   for p in relevant for rule in p["spec"].get(key, []))

    return side("Ingress", dst, src) and side("Egress", src, dst)
