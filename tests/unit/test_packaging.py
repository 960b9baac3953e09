"""The deployment files: the systemd unit and GPU drop-in, install.sh, the Dockerfile and the compose demo.

systemd-analyze checks the unit offline (verify, and the security exposure the issue asks to keep at or under
2.0); the Dockerfile, the compose file and the Orthanc Lua script are checked statically, with hadolint,
``docker compose config`` and ``luac`` when those tools are installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxr_node.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
DOCKER = ROOT / "docker"
UNIT = SYSTEMD / "cxr-node.service"
GPU_DROPIN = SYSTEMD / "cxr-node-gpu.conf"
INSTALL = SYSTEMD / "install.sh"
EXEC_START = "/opt/cxr-node/.venv/bin/cxr-node"
MAX_EXPOSURE = 2.0


def tool(*names: str) -> str:
    """Return the first of ``names`` found on PATH, or skip the test naming what is missing."""
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip(f"{' or '.join(names)} not installed")


def directives(text: str) -> dict[str, list[str]]:
    """Return every ``Key=value`` of a unit file, values in order (comments and sections dropped)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def unit_with_existing_binary(folder: Path, dropin: Path | None = None) -> Path:
    """Copy the unit into ``folder`` with ExecStart pointing at a cxr-node that exists here (verify needs one)."""
    here = Path(sys.executable).parent / "cxr-node"
    binary = here if here.exists() else Path(shutil.which("true") or "/bin/true")
    unit = folder / UNIT.name
    unit.write_text(UNIT.read_text().replace(EXEC_START, str(binary)))
    if dropin is not None:
        (folder / f"{UNIT.name}.d").mkdir()
        shutil.copy(dropin, folder / f"{UNIT.name}.d" / "gpu.conf")
    return unit


def exposure(*args: str) -> float:
    """Run ``systemd-analyze security --offline=true`` and return the overall exposure level."""
    analyze = tool("systemd-analyze")
    done = subprocess.run([analyze, "security", "--offline=true", *args], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert match, f"no exposure level in the output:\n{done.stdout}\n{done.stderr}"
    return float(match.group(1))


# ---- systemd ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropin", [None, GPU_DROPIN], ids=["unit", "unit+gpu"])
def test_unit_verifies(tmp_path: Path, dropin: Path | None) -> None:
    """systemd-analyze verify accepts the unit (and the GPU drop-in) with no warning at all."""
    analyze = tool("systemd-analyze")
    unit = unit_with_existing_binary(tmp_path, dropin)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert str(tmp_path) not in done.stdout + done.stderr, done.stdout + done.stderr


def test_unit_exposure(tmp_path: Path) -> None:
    """The unit's offline security exposure is at most 2.0 (and --threshold agrees)."""
    assert exposure(str(UNIT)) <= MAX_EXPOSURE
    analyze = tool("systemd-analyze")
    threshold = ["--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT)]
    assert subprocess.run([analyze, "security", *threshold], capture_output=True, timeout=60).returncode == 0


def test_unit_with_gpu_dropin_exposure(tmp_path: Path) -> None:
    """With the GPU drop-in installed as install.sh installs it, the exposure stays at most 2.0."""
    units = tmp_path / "etc/systemd/system"
    (units / f"{UNIT.name}.d").mkdir(parents=True)
    shutil.copy(UNIT, units / UNIT.name)
    shutil.copy(GPU_DROPIN, units / f"{UNIT.name}.d" / "gpu.conf")
    with_gpu = exposure(f"--root={tmp_path}", UNIT.name)
    assert exposure(str(UNIT)) < with_gpu <= MAX_EXPOSURE


def test_unit_runs_the_supervisor_as_notify_service() -> None:
    """The unit runs `cxr-node serve` from /opt as user cxr-node, Type=notify, main-PID notifications only."""
    found = directives(UNIT.read_text())
    assert found["ExecStart"] == [f"{EXEC_START} serve"]
    assert found["Type"] == ["notify"]
    assert found["NotifyAccess"] == ["main"]
    assert found["User"] == found["Group"] == ["cxr-node"]
    assert found["Restart"] == ["on-failure"]
    assert found["KillMode"] == ["mixed"]


def test_unit_directories_and_environment() -> None:
    """State, logs and configuration directories match the environment the node is given."""
    found = directives(UNIT.read_text())
    assert found["StateDirectory"] == found["LogsDirectory"] == found["ConfigurationDirectory"] == ["cxr-node"]
    env = dict(item.split("=", 1) for item in found["Environment"])
    assert env["CXR_NODE_CONFIG"] == "/etc/cxr-node/node.yaml"
    assert env["CXR_NODE_STORAGE__ROOT"] == "/var/lib/cxr-node"
    assert env["CXR_NODE_LOGGING__FORMAT"] == "json"
    assert found["UMask"] == ["0027"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("SystemCallFilter", "@system-service"),
        ("SystemCallErrorNumber", "EPERM"),
        ("MemoryDenyWriteExecute", "no"),
    ],
)
def test_unit_hardening(key: str, value: str) -> None:
    """Each hardening directive the issue names is set as documented in docs/operations.md."""
    assert value in directives(UNIT.read_text())[key]


def test_gpu_dropin_allows_only_nvidia_devices() -> None:
    """The GPU drop-in opens /dev for the NVIDIA character devices only, behind a closed device policy."""
    found = directives(GPU_DROPIN.read_text())
    assert found["PrivateDevices"] == ["no"]
    assert found["DevicePolicy"] == ["closed"]
    assert found["DeviceAllow"]
    assert all(item.startswith("char-nvidia") and item.endswith(" rw") for item in found["DeviceAllow"])


def test_install_script_matches_the_unit() -> None:
    """install.sh installs the venv, config and state where the unit looks for them, with the pinned torch."""
    script = INSTALL.read_text()
    assert script.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script
    assert "readonly PREFIX=/opt/cxr-node" in script
    assert "readonly CONF_DIR=/etc/cxr-node" in script
    assert "readonly STATE_DIR=/var/lib/cxr-node" in script
    assert "readonly SERVICE_USER=cxr-node" in script
    assert "torch==2.14.1 torchvision==0.29.1" in script
    assert "uv " not in script


def test_install_script_syntax() -> None:
    """install.sh parses under bash -n, and shellcheck (when installed) finds nothing."""
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (bash -n passed)")
    done = subprocess.run([shellcheck, str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout


def test_makefile_install_service_target() -> None:
    """`make install-service` is a phony target that runs systemd/install.sh with GPU and DESTDIR passed on."""
    makefile = (ROOT / "Makefile").read_text()
    phony = next(line for line in makefile.splitlines() if line.startswith(".PHONY:"))
    assert "install-service" in phony.split()
    recipe = makefile.split("\ninstall-service:", 1)[1].split("\n\n", 1)[0]
    assert "bash systemd/install.sh" in recipe
    assert "GPU=" in recipe
    assert "DESTDIR=" in recipe


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DESTDIR install of this checkout with the GPU drop-in (pip, torch from the local wheels: minutes)."""
    root = tmp_path_factory.mktemp("stage")
    root.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "DESTDIR": str(root), "GPU": "1"}
    subprocess.run(["bash", str(INSTALL)], env=env, check=True, timeout=900)
    return root


@pytest.mark.slow
def test_install_script_staged(staged: Path) -> None:
    """A DESTDIR install lays out the service, keeps an edited config on re-run and passes verify --root."""
    analyze = tool("systemd-analyze")
    conf = staged / "etc/cxr-node/node.yaml"
    assert "manifest: /opt/cxr-node/models/demo/manifest.yaml" in conf.read_text()
    assert (staged / "opt/cxr-node/models/demo/manifest.yaml").is_file()
    assert (staged / "etc/systemd/system/cxr-node.service.d/gpu.conf").is_file()
    conf.write_text(conf.read_text() + "# edited by the site\n")
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "DESTDIR": str(staged)}
    subprocess.run(["bash", str(INSTALL)], env=env, check=True, timeout=900)
    assert conf.read_text().endswith("# edited by the site\n")
    units = staged / "usr/lib/systemd/system"
    if not units.exists():
        shutil.copytree("/usr/lib/systemd/system", units, symlinks=True)
    done = subprocess.run([analyze, "verify", f"--root={staged}", UNIT.name], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def install_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a DESTDIR-staged install.sh run under ``root``."""
    return {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "DESTDIR": str(root), **extra}


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"ROLES": "receiver gpu"}, "unknown role 'gpu'"),
        ({"ROLES": "receiver,sender"}, "unknown role 'receiver,sender'"),
        ({"ROLES": " "}, "ROLES is empty"),
        ({"ROLES": "worker", "CXR_NODE_UID": "x998"}, "numeric ids"),
        ({"CXR_NODE_GID": "0"}, "numeric ids"),
    ],
    ids=["unknown-role", "commas", "blank", "uid", "gid"],
)
def test_install_script_refuses_bad_roles_and_ids(tmp_path: Path, variables: dict[str, str], message: str) -> None:
    """A misspelt ROLES or a non-numeric id stops install.sh before it installs anything."""
    done = subprocess.run(
        ["bash", str(INSTALL)], env=install_env(tmp_path / "stage", **variables), capture_output=True, text=True
    )
    assert done.returncode != 0
    assert message in done.stderr
    assert not (tmp_path / "stage").exists()


def test_install_script_roles_mode_installs_the_scale_out_files() -> None:
    """ROLES mode installs the role units, the GPU drop-in as the worker's, the cluster CLI and database.env from
    the files docs/scale-out.md and tests/unit/test_deploy.py describe, and never enables cxr-node.service."""
    script = INSTALL.read_text()
    assert 'install -m 0644 "$SRC/systemd/$unit" "$unit_dir/$unit"' in script
    assert "unit=cxr-node-$role.service" in script
    assert "cxr-node-worker.service.d/gpu.conf" in script
    assert '"$SRC/deploy/systemd/cxr-node-cluster" "$DESTDIR/usr/local/bin/cxr-node-cluster"' in script
    assert '"$SRC/deploy/systemd/database.env.example" "$env_file"' in script
    assert "readonly ALL_ROLES=(receiver worker sender)" in script
    roles = script.split("\ninstall_roles() {", 1)[1].split("\n}\n", 1)[0]
    assert 'systemctl enable "${units[@]}"' in roles
    assert re.search(r"\$\{?UNIT(?![A-Z_])|cxr-node\.service", roles) is None  # neither installed nor enabled
    for path in ("systemd/cxr-node-receiver.service", "systemd/cxr-node-worker.service",
                 "systemd/cxr-node-sender.service", "deploy/systemd/cxr-node-cluster",
                 "deploy/systemd/database.env.example"):  # fmt: skip
        assert (ROOT / path).is_file(), path


@pytest.fixture(scope="module")
def staged_roles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DESTDIR install of this checkout in scale-out mode: receiver and worker, with the GPU drop-in (minutes)."""
    root = tmp_path_factory.mktemp("stage-roles")
    root.chmod(0o755)
    subprocess.run(["bash", str(INSTALL)], env=install_env(root, ROLES="receiver worker", GPU="1"), check=True,
                   timeout=900)  # fmt: skip
    return root


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_install_script_roles_staged(staged_roles: Path) -> None:
    """ROLES stages the role units named, the worker's GPU drop-in, the cluster CLI, database.env and an empty
    owner-only db-password, no identifier key and no cxr-node.service; a second run (another role, no GPU=1)
    adds that role, keeps the site's database.env, password and drop-in, and the units pass verify --root."""
    units = staged_roles / "etc/systemd/system"
    conf = staged_roles / "etc/cxr-node"
    assert sorted(path.name for path in units.glob("*.service")) == ["cxr-node-receiver.service",
                                                                    "cxr-node-worker.service"]  # fmt: skip
    assert not (units / UNIT.name).exists() and not (units / f"{UNIT.name}.d").exists()
    assert (units / "cxr-node-worker.service.d/gpu.conf").read_text() == GPU_DROPIN.read_text()
    for role in ("receiver", "worker"):
        assert (units / f"cxr-node-{role}.service").read_text() == (SYSTEMD / f"cxr-node-{role}.service").read_text()
    cluster = staged_roles / "usr/local/bin/cxr-node-cluster"
    assert cluster.read_text() == (ROOT / "deploy/systemd/cxr-node-cluster").read_text()
    assert cluster.stat().st_mode & 0o777 == 0o755
    database_env, password = conf / "database.env", conf / "db-password"
    assert database_env.read_text() == (ROOT / "deploy/systemd/database.env.example").read_text()
    assert database_env.stat().st_mode & 0o777 == 0o640
    assert password.read_text() == "" and password.stat().st_mode & 0o777 == 0o600
    assert (conf / "node.yaml").is_file()
    assert not (staged_roles / "var/lib/cxr-node/identifier.key").exists()

    database_env.write_text("CXR_NODE_STORAGE__DATABASE=postgresql://cxr_node@db.site:5432/cxr_node\n")
    password.write_text("the site's password\n")
    subprocess.run(["bash", str(INSTALL)], env=install_env(staged_roles, ROLES="sender"), check=True, timeout=900)
    assert database_env.read_text() == "CXR_NODE_STORAGE__DATABASE=postgresql://cxr_node@db.site:5432/cxr_node\n"
    assert password.read_text() == "the site's password\n" and password.stat().st_mode & 0o777 == 0o600
    assert sorted(path.name for path in units.glob("*.service")) == [
        "cxr-node-receiver.service", "cxr-node-sender.service", "cxr-node-worker.service"]  # fmt: skip
    assert (units / "cxr-node-worker.service.d/gpu.conf").is_file()  # kept up to date without GPU=1
    assert not (units / UNIT.name).exists()

    analyze = tool("systemd-analyze")
    system = staged_roles / "usr/lib/systemd/system"
    if not system.exists():
        shutil.copytree("/usr/lib/systemd/system", system, symlinks=True)
    names = [f"cxr-node-{role}.service" for role in ("receiver", "worker", "sender")]
    done = subprocess.run([analyze, "verify", f"--root={staged_roles}", *names], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_node_works_under_the_unit_sandbox(staged: Path) -> None:
    """The staged node stores and analyses phantoms under the unit's seccomp filters, read-only /, as nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mount and network namespaces)")
    probe = subprocess.run(["/usr/bin/python3", "-c", "import seccomp"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("python3-seccomp not installed (apt-get install python3-seccomp)")
    tool("storescu")
    done = subprocess.run([str(SYSTEMD / "sandbox/check.sh"), str(staged)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4/4 analysed" in done.stdout


# ---- docker -------------------------------------------------------------------------------------------


def compose() -> dict:  # type: ignore[type-arg]
    """Return docker/compose.yaml parsed."""
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def orthanc_env() -> dict[str, str]:
    """Return the Orthanc service's environment."""
    return compose()["services"]["orthanc"]["environment"]


def test_dockerfile_shape() -> None:
    """Multi-stage, CPU/CUDA build argument, numeric non-root user, health check, port, volume, pinned torch."""
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+ AS build$", text, re.MULTILINE)
    assert re.search(r"^FROM \S+ AS runtime$", text, re.MULTILINE)
    assert "ARG VARIANT=cpu" in text
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n.*cxr-node echo", text, re.MULTILINE)
    assert re.search(r"^EXPOSE 11112$", text, re.MULTILINE)
    assert 'VOLUME ["/var/lib/cxr-node"]' in text
    assert "torch==2.14.1 torchvision==0.29.1" in text


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    """Every COPY source from the build context exists and is let through Dockerfile.dockerignore."""
    text = (DOCKER / "Dockerfile").read_text()
    allowed = [line[1:].rstrip("/") for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]  # fmt: skip
    sources = [s for line in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE) for s in line.split()]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), source


def test_hadolint() -> None:
    """hadolint finds nothing in the Dockerfile."""
    hadolint = tool("hadolint")
    done = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout


def test_container_config_is_valid() -> None:
    """docker/node.yaml loads as the image runs it, with a manifest the image ships."""
    settings = load_settings(DOCKER / "node.yaml", environ={})
    manifest = str(settings.models.manifest)
    assert manifest.startswith("/opt/cxr-node/models/")
    assert (ROOT / "models" / manifest.removeprefix("/opt/cxr-node/models/")).is_file()
    assert str(settings.storage.root) == "/var/lib/cxr-node"


def test_compose_wires_orthanc_to_the_node() -> None:
    """Orthanc's DicomModalities entry names the node's AE title, service name and port."""
    node = load_settings(DOCKER / "node.yaml", environ={}).node
    modalities = json.loads(orthanc_env()["ORTHANC__DICOM_MODALITIES"])
    ae_title, host, port = modalities["cxr-node"]
    assert (ae_title, port) == (node.ae_title, node.port)
    assert host in compose()["services"]
    assert compose()["services"]["cxr-node"]["environment"]["CXR_NODE_NODE__AE_TITLE"] == node.ae_title


def test_compose_wires_the_node_to_orthanc() -> None:
    """The node's destination is Orthanc's service name, DICOM port and AE title."""
    (destination,) = load_settings(DOCKER / "node.yaml", environ={}).destinations
    env = orthanc_env()
    assert destination.host == "orthanc"
    assert destination.host in compose()["services"]
    assert (destination.ae_title, destination.port) == (env["ORTHANC__DICOM_AET"], int(env["ORTHANC__DICOM_PORT"]))


def test_compose_lua_script_is_mounted_and_targets_the_node() -> None:
    """The Lua script Orthanc loads is the mounted docker/orthanc/autoroute.lua, routing to the node's entry."""
    (script,) = json.loads(orthanc_env()["ORTHANC__LUA_SCRIPTS"])
    mounts = dict(reversed(v.split(":")[:2]) for v in compose()["services"]["orthanc"]["volumes"])
    source = DOCKER / mounts[script]
    assert source == DOCKER / "orthanc" / "autoroute.lua"
    assert "local NODE_MODALITY = 'cxr-node'" in source.read_text()
    assert "cxr-node" in json.loads(orthanc_env()["ORTHANC__DICOM_MODALITIES"])


def test_compose_volumes_build_and_ports() -> None:
    """Both states live on declared named volumes; the node is built from docker/Dockerfile; ports on loopback."""
    spec = compose()
    services = spec["services"]
    named = {v.split(":")[0] for s in services.values() for v in s["volumes"] if not v.startswith(".")}
    assert named == set(spec["volumes"]) == {"orthanc-db", "cxr-node-state"}
    node = services["cxr-node"]
    assert "cxr-node-state:/var/lib/cxr-node" in node["volumes"]
    assert "./node.yaml:/etc/cxr-node/node.yaml:ro" in node["volumes"]
    assert (DOCKER / node["build"]["context"] / node["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    ports = [p for s in services.values() for p in s["ports"]]
    assert ports
    assert all(p.startswith("127.0.0.1:") for p in ports)
    assert "127.0.0.1:11112:11112" in node["ports"]


def test_docker_compose_config() -> None:
    """`docker compose config` (or docker-compose) accepts the file; no engine is needed for that."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        command = [docker, "compose"]
    else:
        command = [tool("docker-compose")]
    done = subprocess.run(
        [*command, "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_lua_script_parses() -> None:
    """luac -p accepts the Orthanc auto-routing script."""
    luac = tool("luac5.4", "luac5.3", "luac")
    subprocess.run([luac, "-p", str(DOCKER / "orthanc" / "autoroute.lua")], check=True, timeout=30)


def test_lua_routes_chest_radiographs_but_not_our_outputs() -> None:
    """With Orthanc's functions stubbed, CR/DX are sent to the node; our outputs and other modalities are not."""
    lua = tool("lua5.4", "lua5.3", "lua")
    program = """
        sent = {}
        function SendToModality(id, modality) table.insert(sent, id .. '>' .. modality) end
        function print() end
        dofile(arg[1])
        local pacs = {RequestOrigin = 'DicomProtocol', RemoteAet = 'PACS'}
        OnStoredInstance('cr', {Modality = 'CR'}, {}, pacs)
        OnStoredInstance('dx', {Modality = 'DX', Manufacturer = 'Acme'}, {}, pacs)
        OnStoredInstance('ct', {Modality = 'CT'}, {}, pacs)
        OnStoredInstance('ours', {Modality = 'DX', Manufacturer = 'cxr-node'}, {}, pacs)
        OnStoredInstance('ai', {Modality = 'CR', SeriesDescription = 'AI CXR analysis - overlay'}, {}, pacs)
        OnStoredInstance('back', {Modality = 'CR'}, {}, {RequestOrigin = 'DicomProtocol', RemoteAet = 'CXR_NODE'})
        io.write(table.concat(sent, ' '))
    """
    done = subprocess.run(
        [lua, "-", str(DOCKER / "orthanc" / "autoroute.lua")], input=program, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "cr>cxr-node dx>cxr-node"
