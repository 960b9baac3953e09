"""The scale-out deployment: the Kubernetes manifests under deploy/kubernetes and the per-role systemd units.

Every manifest is parsed, built with ``kubectl kustomize`` and validated strictly (unknown fields refused)
against the Kubernetes JSON schemas with kubernetes-validate, each when the tool is installed; KEDA's objects,
whose schemas come with KEDA's CRDs, are checked for the fields KEDA requires. The manifests must agree with the
node: the ConfigMap's node.yaml loads with :mod:`cxr_node.config` under every pod's environment, ports and paths
match that configuration, and KEDA's query runs on the node's jobs table. The role units are checked offline
with ``systemd-analyze`` (verify, security) and against cxr-node.service's hardening; the CLI wrapper with
shellcheck.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from cxr_node.config import Settings, load_settings
from cxr_node.jobs.sqlite import SqliteStore
from cxr_node.jobs.states import JobState
from tests.unit.test_packaging import directives, tool

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = KUBE / "kustomization.yaml"
EXAMPLE_SECRET = KUBE / "secret.example.yaml"
SYSTEMD = ROOT / "systemd"
SINGLE_HOST_UNIT = SYSTEMD / "cxr-node.service"
GPU_DROPIN = SYSTEMD / "cxr-node-gpu.conf"
CLUSTER_CLI = ROOT / "deploy" / "systemd" / "cxr-node-cluster"
DATABASE_ENV = ROOT / "deploy" / "systemd" / "database.env.example"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SCALE_OUT_DOC = ROOT / "docs" / "scale-out.md"
ROLES = ("receiver", "worker", "sender")
EXEC_START = "/opt/cxr-node/.venv/bin/cxr-node"
MAX_EXPOSURE = 2.0
KEDA_API = "keda.sh/v1alpha1"
OLDEST_KUBERNETES = "1.29.0"
"""The oldest Kubernetes the manifests are checked against (besides kubernetes-validate's newest)."""
LIVENESS_WINDOW_S = 300
"""How long a pod's /healthz may fail before it is restarted: longer than a database fail-over takes."""
HARDENING = (
    "NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities", "ProtectSystem", "ProtectHome", "PrivateTmp",
    "PrivateDevices", "PrivateUsers", "PrivateMounts", "ProtectKernelTunables", "ProtectKernelModules",
    "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname", "ProtectProc",
    "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality", "RemoveIPC", "KeyringMode",
    "RestrictAddressFamilies", "MemoryDenyWriteExecute", "SystemCallArchitectures", "SystemCallFilter",
    "SystemCallErrorNumber", "UMask", "User", "Group", "LimitNOFILE", "KillMode", "Type", "NotifyAccess",
)  # fmt: skip
"""cxr-node.service's directives every role unit keeps as they are (docs/operations.md, Hardening)."""

Manifest = dict[str, Any]


def documents(path: Path) -> list[Manifest]:
    """Every YAML document of ``path`` (empty ones dropped)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization() -> Manifest:
    """deploy/kubernetes/kustomization.yaml."""
    return documents(KUSTOMIZATION)[0]


def listed() -> list[Manifest]:
    """The objects of the files kustomization.yaml lists, as written (before kustomize)."""
    return [doc for name in kustomization()["resources"] for doc in documents(KUBE / name)]


def find(kind: str, name: str) -> Manifest:
    """The listed object of ``kind`` called ``name``."""
    found = [doc for doc in listed() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads() -> list[Manifest]:
    """The listed Deployments and Jobs: every object that runs the node."""
    return [doc for doc in listed() if doc["kind"] in ("Deployment", "Job")]


def pod(workload: Manifest) -> Manifest:
    """The pod spec of a Deployment or Job."""
    spec: Manifest = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Manifest, init: bool = True) -> list[Manifest]:
    """The containers of a workload's pod, its init containers first when ``init``."""
    spec = pod(workload)
    return [*(spec.get("initContainers", []) if init else []), *spec["containers"]]


def main_container(workload: Manifest) -> Manifest:
    """The one container of a workload's pod."""
    (container,) = pod(workload)["containers"]
    return container


def deployment(role: str) -> Manifest:
    """The Deployment of ``role``."""
    return find("Deployment", f"cxr-node-{role}")


def environment(container: Manifest) -> dict[str, str]:
    """A container's environment (plain values only: the manifests set no others)."""
    return {item["name"]: item["value"] for item in container.get("env", [])}


def mounts(workload: Manifest, container: Manifest) -> dict[str, Manifest]:
    """Mount path → the pod volume mounted there, for one container of the workload."""
    volumes = {volume["name"]: volume for volume in pod(workload)["volumes"]}
    return {mount["mountPath"]: volumes[mount["name"]] for mount in container.get("volumeMounts", [])}


def node_yaml(tmp_path: Path) -> Path:
    """The ConfigMap's node.yaml, written to a file."""
    path = tmp_path / "node.yaml"
    path.write_text(find("ConfigMap", "cxr-node-config")["data"]["node.yaml"])
    return path


def settings_of(tmp_path: Path, container: Manifest) -> Settings:
    """The node's settings as ``container`` loads them: the ConfigMap's file under the container's environment."""
    return load_settings(node_yaml(tmp_path), environ=environment(container))


def container_port(container: Manifest, port: int | str) -> int:
    """The number of a container port given by number or by name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def probes(container: Manifest) -> Iterator[tuple[str, Manifest]]:
    """(kind, probe) for each probe a container declares."""
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            yield kind, container[kind]


def secret_keys() -> set[str]:
    """The keys the example Secret defines."""
    (secret,) = documents(EXAMPLE_SECRET)
    return set(secret.get("stringData", {})) | set(secret.get("data", {}))


def role_unit(role: str) -> Path:
    """systemd/cxr-node-<role>.service."""
    return SYSTEMD / f"cxr-node-{role}.service"


def unit_environment(found: dict[str, list[str]]) -> dict[str, str]:
    """The ``Environment=`` assignments of a unit."""
    return dict(item.split("=", 1) for item in found["Environment"])


# ---- the manifests as files -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(KUBE.glob("*.yaml")), ids=lambda p: p.name)
def test_manifest_parses_into_named_objects(path: Path) -> None:
    """Each file under deploy/kubernetes is YAML whose every document names its apiVersion, kind and name."""
    docs = documents(path)
    assert docs, f"{path.name}: no document"
    for doc in docs:
        assert {"apiVersion", "kind"} <= doc.keys(), f"{path.name}: {sorted(doc)}"
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], path.name
            assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "cxr-node", path.name


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    """kustomize applies every manifest except secret.example.yaml, which must never replace the site's Secret."""
    files = {path.name for path in KUBE.glob("*.yaml")} - {KUSTOMIZATION.name, EXAMPLE_SECRET.name}
    assert sorted(kustomization()["resources"]) == sorted(files)
    assert kustomization()["namespace"] == "cxr-node"


def test_kustomize_builds_every_object_into_the_namespace() -> None:
    """`kubectl kustomize` builds the listed objects, every one in namespace cxr-node, images from the registry."""
    kubectl = tool("kubectl")
    done = subprocess.run([kubectl, "kustomize", str(KUBE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    built = [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]
    names = sorted((doc["kind"], doc["metadata"]["name"]) for doc in built)
    assert names == sorted((doc["kind"], doc["metadata"]["name"]) for doc in listed())
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "cxr-node", doc["metadata"]["name"]
    (registry,) = kustomization()["images"]
    images = {c["image"] for doc in built if doc["kind"] in ("Deployment", "Job") for c in containers(doc)}
    assert images == {f"{registry['newName']}:cpu", f"{registry['newName']}:cuda"}


# ---- the Kubernetes schemas ---------------------------------------------------------------------------------


def core_objects() -> list[Manifest]:
    """Every object whose schema Kubernetes itself defines: all but KEDA's, plus the example Secret."""
    return [doc for doc in [*listed(), *documents(EXAMPLE_SECRET)] if doc["apiVersion"] != KEDA_API]


@pytest.mark.parametrize("version", ["latest", OLDEST_KUBERNETES])
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    """Every core object validates strictly (unknown or misspelt fields refused) against Kubernetes' schemas."""
    validator = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    wanted = validator.latest_version() if version == "latest" else version
    for doc in core_objects():
        validator.validate(doc, wanted, strict=True)


def test_schema_check_refuses_a_misspelt_field() -> None:
    """The strict check is not vacuous: a misspelt probe in the receiver Deployment is refused."""
    validator = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    broken = deployment("receiver")
    container = main_container(broken)
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(validator.ValidationError, match="readinesProbe"):
        validator.validate(broken, validator.latest_version(), strict=True)


# ---- KEDA: ScaledObject and TriggerAuthentication (CRDs) ----------------------------------------------------


def keda_objects(kind: str) -> list[Manifest]:
    """The listed KEDA objects of ``kind``."""
    return [doc for doc in listed() if doc["apiVersion"] == KEDA_API and doc["kind"] == kind]


def test_scaled_object_has_the_fields_keda_requires() -> None:
    """The ScaledObject targets the worker Deployment with a postgresql trigger whose metadata are all strings."""
    (scaled,) = keda_objects("ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"name": deployment("worker")["metadata"]["name"]}
    assert isinstance(spec["minReplicaCount"], int) and isinstance(spec["maxReplicaCount"], int)
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "postgresql"
    metadata = trigger["metadata"]
    assert {"host", "port", "dbName", "userName", "sslmode", "query", "targetQueryValue"} <= metadata.keys()
    assert all(isinstance(value, str) for value in metadata.values()), metadata
    assert metadata["port"].isdigit() and float(metadata["targetQueryValue"]) > 0
    assert metadata["sslmode"] in {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}
    (auth,) = keda_objects("TriggerAuthentication")
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}


def test_trigger_authentication_reads_the_sites_secret() -> None:
    """KEDA's password comes from a key of the Secret the site creates (secret.example.yaml)."""
    (auth,) = keda_objects("TriggerAuthentication")
    (reference,) = auth["spec"]["secretTargetRef"]
    assert reference["parameter"] == "password"
    assert reference["name"] == documents(EXAMPLE_SECRET)[0]["metadata"]["name"]
    assert reference["key"] in secret_keys()


def test_keda_polls_the_database_the_node_uses(tmp_path: Path) -> None:
    """KEDA's host, port and database are those of storage.database (its user may be a read-only one)."""
    url = urlsplit(settings_of(tmp_path, main_container(deployment("worker"))).storage.database)
    (scaled,) = keda_objects("ScaledObject")
    metadata = scaled["spec"]["triggers"][0]["metadata"]
    assert (metadata["host"], int(metadata["port"]), metadata["dbName"]) == (url.hostname, url.port, url.path[1:])


def test_keda_query_counts_queued_and_running_jobs(tmp_path: Path) -> None:
    """The query names the jobs table, its state column and real job states, and runs on the node's schema."""
    (scaled,) = keda_objects("ScaledObject")
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    match = re.fullmatch(r"SELECT count\(\*\) FROM jobs WHERE state IN \(([^)]*)\)", query)
    assert match, query
    states = {state.strip().strip("'") for state in match.group(1).split(",")}
    assert states == {JobState.QUEUED.value, JobState.RUNNING.value}
    SqliteStore(tmp_path / "jobs.sqlite3", fsync=False).close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute(query).fetchall() == [(0,)]


# ---- the manifests agree with the node's configuration ------------------------------------------------------


@pytest.mark.parametrize("role", [*ROLES, "db-upgrade"])
def test_config_map_loads_in_every_pod(tmp_path: Path, role: str) -> None:
    """The ConfigMap's node.yaml loads with cxr_node.config under each pod's environment, on PostgreSQL."""
    workload = find("Job", "cxr-node-db-upgrade") if role == "db-upgrade" else deployment(role)
    found = settings_of(tmp_path, main_container(workload))
    url = urlsplit(found.storage.database)
    assert found.storage.shared and url.scheme == "postgresql"
    assert url.password is None and url.username and url.port and url.path.strip("/")
    assert found.metrics.enabled and found.metrics.host == "0.0.0.0"


def test_worker_pod_runs_on_its_gpu_with_its_cpu_share(tmp_path: Path) -> None:
    """The worker requests one GPU, insists on CUDA, and sizes its process pool to its CPU limit less one."""
    worker = main_container(deployment("worker"))
    resources = worker["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    found = settings_of(tmp_path, worker)
    assert found.compute.device == "cuda"
    assert found.worker.cpu_processes == int(resources["limits"]["cpu"]) - 1
    assert worker["image"].endswith(":cuda")


def test_service_port_is_the_dicom_port(tmp_path: Path) -> None:
    """The Service's port and the receivers' DICOM containerPort are node.port; it selects the receivers."""
    receiver = deployment("receiver")
    port = settings_of(tmp_path, main_container(receiver)).node.port
    service = find("Service", "cxr-node-dicom")
    (entry,) = service["spec"]["ports"]
    assert entry["port"] == port
    assert container_port(main_container(receiver), entry["targetPort"]) == port
    assert service["spec"]["selector"] == receiver["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["type"] in ("LoadBalancer", "NodePort")
    assert service["spec"]["externalTrafficPolicy"] == "Local"  # node.allowed_ips sees the PACS's address


@pytest.mark.parametrize("role", ROLES)
def test_probes_hit_healthz_on_the_metrics_port(tmp_path: Path, role: str) -> None:
    """Every probe of a role's pod asks /healthz on metrics.port, which Prometheus's annotation names too."""
    workload = deployment(role)
    container = main_container(workload)
    port = settings_of(tmp_path, container).metrics.port
    found = dict(probes(container))
    assert set(found) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for kind, probe in found.items():
        assert probe["httpGet"]["path"] == "/healthz", kind
        assert container_port(container, probe["httpGet"]["port"]) == port, kind
    assert workload["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)


def window(probe: Manifest) -> int:
    """Seconds a probe may fail before Kubernetes acts (Kubernetes' defaults where unset)."""
    return int(probe.get("periodSeconds", 10)) * int(probe.get("failureThreshold", 3))


@pytest.mark.parametrize("role", ROLES)
def test_liveness_outlasts_a_database_fail_over(role: str) -> None:
    """/healthz reads the database: the liveness probe waits 5 minutes, so that a fail-over does not restart every
    pod at once; each probe waits longer than its period's default second for the database."""
    container = main_container(deployment(role))
    assert window(container["livenessProbe"]) >= LIVENESS_WINDOW_S
    for kind, probe in probes(container):
        assert probe.get("timeoutSeconds", 1) >= 5, kind


def test_worker_has_time_to_load_its_models() -> None:
    """A worker records itself alive only once its models are loaded: its startup probe allows 10 minutes, as
    cxr-node-worker.service's TimeoutStartSec does."""
    startup = main_container(deployment("worker"))["startupProbe"]
    timeout = directives(role_unit("worker").read_text())["TimeoutStartSec"][0]
    assert timeout == "10min" and window(startup) >= 600


@pytest.mark.parametrize("role", [*ROLES, "db-upgrade"])
def test_pods_mount_what_the_configuration_names(tmp_path: Path, role: str) -> None:
    """storage.root is the shared claim, the config file and the password file are mounted where settings say."""
    workload = find("Job", "cxr-node-db-upgrade") if role == "db-upgrade" else deployment(role)
    container = main_container(workload)
    found = settings_of(tmp_path, container)
    mounted = mounts(workload, container)
    claim = mounted[str(found.storage.root)]["persistentVolumeClaim"]["claimName"]
    assert find("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    config = Path(environment(container)["CXR_NODE_CONFIG"])
    assert config.name in find("ConfigMap", mounted[str(config.parent)]["configMap"]["name"])["data"]
    assert found.storage.database_password_file is not None
    assert mounted[str(found.storage.database_password_file.parent)]["emptyDir"]["medium"] == "Memory"
    if role != "db-upgrade":
        assert found.storage.identifier_key is not None
        assert found.storage.identifier_key.parent == found.storage.database_password_file.parent


@pytest.mark.parametrize("role", ROLES)
def test_runtime_dir_is_a_volume_of_each_pod(tmp_path: Path, role: str) -> None:
    """storage.runtime_dir (pid and ready files, the worker's metrics) is an emptyDir of the pod, outside the shared
    volume and apart from the Secret's copies, so that pods never share their runtime files."""
    workload = deployment(role)
    container = main_container(workload)
    found = settings_of(tmp_path, container)
    assert found.storage.runtime_dir is not None and found.storage.run_dir == found.storage.runtime_dir
    mounted = mounts(workload, container)
    volume = mounted[str(found.storage.run_dir)]
    assert "sizeLimit" in volume["emptyDir"]
    assert volume["name"] not in {mounted[str(found.storage.root)]["name"], mounted["/tmp"]["name"]}
    assert not found.storage.run_dir.is_relative_to(found.storage.root)
    assert found.storage.database_password_file is not None
    secrets = found.storage.database_password_file.parent
    assert not found.storage.run_dir.is_relative_to(secrets) and not secrets.is_relative_to(found.storage.run_dir)


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: w["metadata"]["name"])
def test_init_containers_only_copy_secrets(workload: Manifest) -> None:
    """The one init container of every pod copies the Secret's files: nothing is prepared on the shared volume."""
    assert [c["name"] for c in pod(workload).get("initContainers", [])] == ["secrets"]


@pytest.mark.parametrize("role", [*ROLES, "db-upgrade"])
def test_init_container_copies_the_secret_files_owner_only(tmp_path: Path, role: str) -> None:
    """The init container installs, mode 0600, the Secret's files where the configuration reads them."""
    workload = find("Job", "cxr-node-db-upgrade") if role == "db-upgrade" else deployment(role)
    found = settings_of(tmp_path, main_container(workload))
    (copier,) = [c for c in pod(workload)["initContainers"] if c["name"] == "secrets"]
    command = copier["command"]
    assert command[:5] == ["install", "-m", "0600", "-t", str(found.storage.database_password_file.parent)]
    wanted = [found.storage.database_password_file]
    if role != "db-upgrade":  # the schema needs no patient hashing
        wanted.append(found.storage.identifier_key)
    assert {Path(path).name for path in command[5:]} == {path.name for path in wanted if path is not None}
    (secret,) = [v["secret"] for v in pod(workload)["volumes"] if "secret" in v]
    assert {item["path"] for item in secret["items"]} == {Path(path).name for path in command[5:]}
    assert {item["key"] for item in secret["items"]} <= secret_keys()
    assert secret["defaultMode"] == 0o440  # group-readable: the pod's fsGroup lets uid 10001 read it


def test_pods_run_as_the_images_user() -> None:
    """Pods run as uid/gid 10001, the user docker/Dockerfile creates, and its entrypoint is the cxr-node CLI."""
    text = DOCKERFILE.read_text()
    assert "USER 10001:10001" in text
    assert 'ENTRYPOINT ["cxr-node"]' in text
    for workload in workloads():
        context = pod(workload)["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (10001, 10001, 10001)


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: w["metadata"]["name"])
def test_pods_are_locked_down(workload: Manifest) -> None:
    """Non-root, default seccomp, no API token, and each container read-only, unprivileged and bounded."""
    spec = pod(workload)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    for container in containers(workload):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][bound].keys(), container["name"]
    assert "/tmp" in mounts(workload, main_container(workload))  # the one writable place besides the volumes


@pytest.mark.parametrize("role", ROLES)
def test_each_deployment_serves_its_role(role: str) -> None:
    """Each role's Deployment runs `cxr-node serve <role>` (the image's entrypoint is cxr-node)."""
    assert main_container(deployment(role))["args"] == ["serve", role]


def test_job_upgrades_the_schema() -> None:
    """The Job runs `cxr-node db upgrade`, retried on failure, and removes itself so that it can run again."""
    job = find("Job", "cxr-node-db-upgrade")
    assert main_container(job)["args"] == ["db", "upgrade"]
    assert pod(job)["restartPolicy"] == "OnFailure"
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_receivers_survive_a_drain() -> None:
    """Two receivers, spread over nodes, and a disruption budget that keeps one of them up."""
    receiver = deployment("receiver")
    assert receiver["spec"]["replicas"] == 2
    budget = find("PodDisruptionBudget", "cxr-node-receiver")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == receiver["spec"]["template"]["metadata"]["labels"]
    assert "podAntiAffinity" in pod(receiver)["affinity"]


def test_schema_first_selector_leaves_the_roles_out() -> None:
    """docs/scale-out.md applies everything but the roles before an upgrade or a migration: that selector picks the
    namespace, the configuration, the volume and the Job, and no Deployment, Service or KEDA object."""
    match = re.search(r"SCHEMA_FIRST='app\.kubernetes\.io/component notin \(([a-z,-]+)\)'", SCALE_OUT_DOC.read_text())
    assert match, "SCHEMA_FIRST not in docs/scale-out.md"
    left_out = set(match.group(1).split(","))
    picked = sorted(
        doc["kind"] for doc in listed() if doc["metadata"]["labels"].get("app.kubernetes.io/component") not in left_out
    )
    assert picked == ["ConfigMap", "Job", "Namespace", "PersistentVolumeClaim"]


def test_autoscaled_worker_sets_no_replicas() -> None:
    """KEDA owns the worker count: the Deployment sets none, so re-applying the files does not reset it."""
    assert "replicas" not in deployment("worker")["spec"]


# ---- systemd units per role ---------------------------------------------------------------------------------


def unit_with_existing_binary(folder: Path, role: str, dropin: Path | None = None) -> Path:
    """Copy a role unit into ``folder`` with ExecStart pointing at a cxr-node that exists here (verify needs one)."""
    here = Path(sys.executable).parent / "cxr-node"
    binary = here if here.exists() else Path(shutil.which("true") or "/bin/true")
    unit = folder / role_unit(role).name
    unit.write_text(role_unit(role).read_text().replace(EXEC_START, str(binary)))
    if dropin is not None:
        (folder / f"{unit.name}.d").mkdir()
        shutil.copy(dropin, folder / f"{unit.name}.d" / "gpu.conf")
    return unit


@pytest.mark.parametrize(("role", "dropin"), [*((r, None) for r in ROLES), ("worker", GPU_DROPIN)],
                         ids=[*ROLES, "worker+gpu"])  # fmt: skip
def test_role_unit_verifies(tmp_path: Path, role: str, dropin: Path | None) -> None:
    """systemd-analyze verify accepts each role unit (the worker with the GPU drop-in too) with no warning."""
    analyze = tool("systemd-analyze")
    unit = unit_with_existing_binary(tmp_path, role, dropin)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert str(tmp_path) not in done.stdout + done.stderr, done.stdout + done.stderr


@pytest.mark.parametrize("role", ROLES)
def test_role_unit_exposure(role: str) -> None:
    """Each role unit's offline security exposure is at most 2.0, as the single-host unit's."""
    analyze = tool("systemd-analyze")
    threshold = ["--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", str(role_unit(role))]
    done = subprocess.run([analyze, "security", *threshold], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_worker_unit_with_gpu_dropin_exposure(tmp_path: Path) -> None:
    """The worker unit with the GPU drop-in, installed as docs/scale-out.md says, stays at most 2.0."""
    analyze = tool("systemd-analyze")
    units = tmp_path / "etc/systemd/system"
    unit = role_unit("worker")
    (units / f"{unit.name}.d").mkdir(parents=True)
    shutil.copy(unit, units / unit.name)
    shutil.copy(GPU_DROPIN, units / f"{unit.name}.d" / "gpu.conf")
    command = [analyze, "security", "--offline=true", f"--root={tmp_path}", unit.name]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE


@pytest.mark.parametrize("role", ROLES)
def test_role_unit_keeps_the_single_host_hardening(role: str) -> None:
    """Every hardening directive of cxr-node.service is in the role unit with the same value."""
    single, found = directives(SINGLE_HOST_UNIT.read_text()), directives(role_unit(role).read_text())
    assert {key: found.get(key) for key in HARDENING} == {key: single[key] for key in HARDENING}


@pytest.mark.parametrize("role", ROLES)
def test_role_unit_runs_its_role_on_the_shared_root_and_database(role: str) -> None:
    """One role, the shared root writable and mounted first, the database from a file, the password a credential."""
    found = directives(role_unit(role).read_text())
    env = unit_environment(found)
    root = env["CXR_NODE_STORAGE__ROOT"]
    assert found["ExecStart"] == [f"{EXEC_START} serve {role}"]
    assert found["ReadWritePaths"] == found["RequiresMountsFor"] == [root]
    assert found["EnvironmentFile"] == ["/etc/cxr-node/database.env"]  # no leading "-": required
    (credential,) = found["LoadCredential"]
    name, _, source = credential.partition(":")
    assert env["CXR_NODE_STORAGE__DATABASE_PASSWORD_FILE"] == f"%d/{name}"
    assert source == "/etc/cxr-node/db-password"
    assert env["CXR_NODE_CONFIG"] == "/etc/cxr-node/node.yaml"
    # this unit's runtime files (pid and ready files, the worker's metrics): its own folder on local disk
    assert found["RuntimeDirectory"] == [f"cxr-node-{role}"]
    assert env["CXR_NODE_STORAGE__RUNTIME_DIR"] == f"%t/{found['RuntimeDirectory'][0]}"
    assert "BindPaths" not in found
    assert found["Conflicts"] == ["cxr-node.service"]
    assert "2" in found["RestartPreventExitStatus"][0].split()  # a configuration error is not retried


def test_role_units_serve_metrics_on_ports_of_their_own() -> None:
    """Roles sharing a host never ask for the same metrics port."""
    ports = [unit_environment(directives(role_unit(role).read_text()))["CXR_NODE_METRICS__PORT"] for role in ROLES]
    assert len(set(ports)) == len(ROLES) and all(port.isdigit() for port in ports)


def test_role_unit_environment_loads(tmp_path: Path) -> None:
    """The configuration with the units' environment and the example database.env loads, on PostgreSQL."""
    found = directives(role_unit("worker").read_text())
    env = {key: value.replace("%t", "/run") for key, value in unit_environment(found).items()}  # systemd's %t
    env["CXR_NODE_STORAGE__DATABASE_PASSWORD_FILE"] = str(tmp_path / "db-password")
    for line in DATABASE_ENV.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    loaded = load_settings(ROOT / "config" / "node.yaml", environ=env)
    assert loaded.storage.shared and urlsplit(loaded.storage.database).password is None
    assert str(loaded.storage.root) == env["CXR_NODE_STORAGE__ROOT"]
    assert loaded.storage.run_dir == Path("/run/cxr-node-worker")  # this host's own, not under the shared root


def test_cluster_cli_passes_shellcheck() -> None:
    """deploy/systemd/cxr-node-cluster passes shellcheck as a POSIX sh script."""
    shellcheck = tool("shellcheck")
    done = subprocess.run([shellcheck, "-s", "sh", str(CLUSTER_CLI)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout


def test_cluster_cli_uses_the_units_environment() -> None:
    """The CLI wrapper's defaults are the units' storage root, config, database file and password source."""
    text = CLUSTER_CLI.read_text()
    found = directives(role_unit("receiver").read_text())
    env = unit_environment(found)
    assert f'CXR_NODE_STORAGE__ROOT="${{CXR_NODE_STORAGE__ROOT:-{env["CXR_NODE_STORAGE__ROOT"]}}}"' in text
    assert f'CXR_NODE_CONFIG="${{CXR_NODE_CONFIG:-{env["CXR_NODE_CONFIG"]}}}"' in text
    assert f":-{found['EnvironmentFile'][0]}}}" in text
    assert f":-{found['LoadCredential'][0].partition(':')[2]}}}" in text
    assert f"exec {EXEC_START} " in text


def test_scale_out_doc_names_every_deployment_file() -> None:
    """docs/scale-out.md names each manifest, each role unit and the CLI wrapper, so none goes undocumented."""
    text = SCALE_OUT_DOC.read_text()
    files = [*KUBE.glob("*.yaml"), *(role_unit(role) for role in ROLES), CLUSTER_CLI, DATABASE_ENV]
    assert [path.name for path in files if path.name not in text] == []


def test_scale_out_doc_has_nothing_left_to_check() -> None:
    """docs/scale-out.md holds no open CHECK note."""
    assert "<!-- CHECK" not in SCALE_OUT_DOC.read_text()
