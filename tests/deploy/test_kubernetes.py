"""The plain manifests (deploy/kubernetes/), checked offline against the image contract.

Each file, and what `kubectl kustomize deploy/kubernetes` builds from them, passes the strict
Kubernetes 1.33 schemas. The standalone Deployment keeps the hardening, the probes, a grace period
that covers what its own environment asks of SIGTERM, and the Secret named in its comment; the
native-sidecar example puts the bridge among the init containers with restartPolicy Always.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

import bridge

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
KUBERNETES = "1.33.0"
FILES = sorted(p for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")

Manifest = dict[str, Any]

HARDENED = {
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
}


def load(name: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc]


def only(manifests: list[Manifest], kind: str) -> Manifest:
    (found,) = [m for m in manifests if m["kind"] == kind]
    return found


def validate(manifests: list[Manifest]) -> None:
    for manifest in manifests:
        try:
            kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(p) for p in error.path)
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']}: {where}: {error}")


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def stop_seconds(container: dict[str, Any]) -> int:
    """What SIGTERM may take for the bridge: preStop sleep, in-flight requests, outbox replay."""
    env = env_of(container)
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    return int(sleep) + int(env["BRIDGE_SHUTDOWN_TIMEOUT"]) + int(env["BRIDGE_DRAIN_SECONDS"])


def test_the_manifests_are_there() -> None:
    assert [p.name for p in FILES] == ["events-bridge.yaml", "native-sidecar.yaml"]


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_manifest_is_valid_kubernetes_1_33(path: Path) -> None:
    manifests = load(path.name)
    assert manifests
    validate(manifests)


def test_kustomize_build_is_valid_kubernetes_1_33() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    built = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,  # the assert below shows kubectl's own message
    )
    assert built.returncode == 0, built.stderr
    manifests = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert sorted(m["kind"] for m in manifests) == sorted(
        m["kind"] for m in load("events-bridge.yaml")
    )
    validate(manifests)


def test_standalone_deployment_keeps_the_contract() -> None:
    manifests = load("events-bridge.yaml")
    assert sorted(m["kind"] for m in manifests) == [
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    spec = only(manifests, "Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["fsGroup"] == 10001
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    assert container["image"] == f"events-bridge:{bridge.__version__}"
    assert container["securityContext"].items() >= HARDENED.items()
    assert container["securityContext"]["runAsUser"] == 10001
    port = container["ports"][0]["name"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert spec["terminationGracePeriodSeconds"] >= stop_seconds(container)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"/var/lib/events-bridge/outbox", "/tmp"}  # writable; the rest is read-only


def test_standalone_reads_credentials_from_the_secret_its_comment_creates() -> None:
    text = (MANIFESTS / "events-bridge.yaml").read_text()
    assert "kubectl create secret generic events-bridge" in text
    assert "--from-literal=amqp-url=" in text
    assert "--from-literal=client-ids=" in text
    (container,) = only(load("events-bridge.yaml"), "Deployment")["spec"]["template"]["spec"][
        "containers"
    ]
    env = env_of(container)
    assert env["BRIDGE_AMQP_URL"] == {"secretKeyRef": {"name": "events-bridge", "key": "amqp-url"}}
    assert env["BRIDGE_CLIENT_IDS"] == {
        "secretKeyRef": {"name": "events-bridge", "key": "client-ids"}
    }


def test_selectors_match_the_pods() -> None:
    for name in ("events-bridge.yaml", "native-sidecar.yaml"):
        manifests = load(name)
        labels = only(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
        for manifest in manifests:
            selector = manifest.get("spec", {}).get("selector", {})
            selector = selector.get("matchLabels", selector)
            assert selector.items() <= labels.items(), f"{name}: {manifest['kind']}"


def test_native_sidecar_example() -> None:
    manifests = load("native-sidecar.yaml")
    spec = only(manifests, "Deployment")["spec"]["template"]["spec"]
    (sidecar,) = spec["initContainers"]
    assert sidecar["name"] == "events-bridge"
    assert sidecar["restartPolicy"] == "Always"  # what makes it a native sidecar (1.29+)
    assert sidecar["securityContext"].items() >= HARDENED.items()
    assert spec["securityContext"]["runAsUser"] == 10001
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (app,) = spec["containers"]
    assert app["command"] == [
        "/opt/events-bridge/bin/python",
        "/opt/events-bridge/examples/consumer.py",
    ]
    assert app["image"] == sidecar["image"] == f"events-bridge:{bridge.__version__}"
    # The sidecar is stopped only after the app has exited: the grace period holds both.
    assert spec["terminationGracePeriodSeconds"] > stop_seconds(sidecar)
    (service,) = [m for m in manifests if m["kind"] == "Service"]
    assert service["spec"]["ports"][0]["targetPort"] == sidecar["ports"][0]["name"]


# -- the journal (SPEC §10): commented out, and valid once uncommented ----------------------------

COMMENTED_YAML = re.compile(r"^(\s+)# (- .*|  \S.*)$")  # `# - item` and `#   key:` under it
SHIPPED_VARIABLES = set(
    re.findall(r"\$\{(BRIDGE_[A-Z_]+)", (ROOT / "config" / "bridge.yaml").read_text())
)
JOURNAL = "/var/lib/events-bridge/journal"


def uncommented(name: str) -> list[Manifest]:
    """The file with its commented YAML lines (the journal's) taken in, as an operator would."""
    lines = [
        COMMENTED_YAML.sub(r"\1\2", line) for line in (MANIFESTS / name).read_text().splitlines()
    ]
    return [doc for doc in yaml.safe_load_all("\n".join(lines)) if doc]


def bridge_of(manifests: list[Manifest]) -> dict[str, Any]:
    spec = only(manifests, "Deployment")["spec"]["template"]["spec"]
    (found,) = [
        c
        for c in [*spec.get("initContainers", []), *spec["containers"]]
        if c["name"] == "events-bridge"
    ]
    assert isinstance(found, dict)
    return found


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_the_journal_is_off_and_valid_once_uncommented(path: Path) -> None:
    journal_names = ("BRIDGE_JOURNAL_", "BRIDGE_IMS_")
    shipped = bridge_of(load(path.name))
    assert not [n for n in env_of(shipped) if n.startswith(journal_names)]
    assert JOURNAL not in {m["mountPath"] for m in shipped["volumeMounts"]}

    manifests = uncommented(path.name)
    validate(manifests)
    container = bridge_of(manifests)
    env = env_of(container)
    journal = {n for n in env if n.startswith(journal_names)}
    assert journal == {
        "BRIDGE_JOURNAL_URL",
        "BRIDGE_JOURNAL_START",
        "BRIDGE_JOURNAL_STATE_DIR",
        "BRIDGE_IMS_CLIENT_ID",
        "BRIDGE_IMS_CLIENT_SECRET",
        "BRIDGE_IMS_ORG_ID",
    }
    assert journal <= SHIPPED_VARIABLES
    assert env["BRIDGE_JOURNAL_URL"].startswith("https://")
    for name in ("BRIDGE_IMS_CLIENT_ID", "BRIDGE_IMS_CLIENT_SECRET", "BRIDGE_IMS_ORG_ID"):
        assert env[name]["secretKeyRef"]["name"] == "events-bridge", name  # the Secret above
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == JOURNAL]
    assert env["BRIDGE_JOURNAL_STATE_DIR"] == JOURNAL
    assert mount["subPath"] == "journal"
    spec = only(manifests, "Deployment")["spec"]["template"]["spec"]
    assert mount["name"] in {v["name"] for v in spec["volumes"]}
    text = path.read_text()
    for key in ("ims-client-id", "ims-client-secret", "ims-org-id"):
        assert f"--from-literal={key}=" in text  # the comment says how to add it to the Secret
    assert "replicas: 1" in text or only(manifests, "Deployment")["spec"]["replicas"] == 1
