"""The Helm chart (deploy/helm/events-bridge), checked offline against the image contract.

Each rendering (default values, the ci/ values files, persistence, an existing claim, a native
sidecar, ...) passes `helm lint --strict` and the strict Kubernetes 1.33 schemas, and the rendered
objects keep the contract: hardening, probes, a grace period that covers shutdown and outbox drain,
Secret references, the config rolled by checksum, the workload chosen for the outbox, and where
the bridge sits in a sidecar Pod. There is no helm binary here: helm-python-sdk renders with
Helm v4's own Go SDK, so `tpl`, `fail` and sprig behave as in `helm template`.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

import bridge

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "events-bridge"
KUBERNETES = "1.33.0"
RELEASE = "events-bridge"

Manifest = dict[str, Any]


def ci_values(name: str) -> dict[str, Any]:
    values = yaml.safe_load((CHART / "ci" / name).read_text())
    assert isinstance(values, dict)
    return values


def render(values: dict[str, Any] | None = None, release: str = RELEASE) -> list[Manifest]:
    rendered = helm_python.Chart.load(CHART).render(values or {}, name=release, namespace="ns")
    manifests: list[Manifest] = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):  # not NOTES.txt
            manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return manifests


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmRenderError) as caught:
        render(values)
    return str(caught.value)


def only(manifests: list[Manifest], kind: str) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[m['metadata']['name'] for m in found]}"
    return found[0]


def kinds(manifests: list[Manifest]) -> list[str]:
    return sorted(m["kind"] for m in manifests)


def workload(manifests: list[Manifest]) -> Manifest:
    (found,) = [m for m in manifests if m["kind"] in {"Deployment", "StatefulSet"}]
    return found


def pod_spec(manifests: list[Manifest]) -> dict[str, Any]:
    spec = workload(manifests)["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def bridge_container(spec: dict[str, Any]) -> dict[str, Any]:
    (found,) = [
        c
        for c in [*spec.get("initContainers", []), *spec["containers"]]
        if c["name"] == "events-bridge"
    ]
    assert isinstance(found, dict)
    return found


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def validate(manifests: list[Manifest], skip: frozenset[str] = frozenset()) -> None:
    """Strict schemas: unknown fields and wrong types fail, as `kubectl apply` would."""
    for manifest in manifests:
        if manifest["kind"] in skip:
            continue
        try:
            kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(p) for p in error.path)
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']}: {where}: {error}")


SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "ci-sidecar": ci_values("sidecar-values.yaml"),
    "ci-native-sidecar": ci_values("native-sidecar-values.yaml"),
    "persistence": {"persistence": {"enabled": True, "storageClass": "fast", "size": "2Gi"}},
    "existing-claim": {"replicaCount": 1, "persistence": {"existingClaim": "bridge-outbox"}},
    "native-sidecar-persistence": {
        **ci_values("native-sidecar-values.yaml"),
        "persistence": {"enabled": True},
    },
    "secret-created": {
        "secret": {"create": True, "amqpUrl": "amqp://u:p@rabbit:5672/", "clientIds": "a,b"}
    },
    "ci-https": ci_values("https-values.yaml"),
    "https-statefulset": {
        "tls": {"server": {"secretName": "webhook-tls"}},
        "persistence": {"enabled": True},
    },
    "journal-persistence": {
        "replicaCount": 1,
        "persistence": {"enabled": True},
        "journal": {"url": "https://events.adobe.io/events/organizations/1/integrations/2/r"},
    },
    "journal-emptydir-own-secret": {
        "replicaCount": 1,
        "journal": {
            "url": "https://events.adobe.io/events/organizations/1/integrations/2/r",
            "start": "-PT2H",
            "ims": {"existingSecret": "adobe-ims", "tokenUrl": "https://ims.example/token"},
        },
    },
    "journal-replicas-allowed": {
        "journal": {"url": "https://events.adobe.io/x", "allowReplicas": True},
        "persistence": {"enabled": True},
    },
    "workers-otel-config": {
        "bridge": {"workers": 3, "env": {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318"}},
        "config": {"bridgeYaml": "server: {port: 8080}\n"},
        "serviceAccount": {"create": False},
        "podDisruptionBudget": {"enabled": False},
    },
}


def test_chart_versions_follow_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == bridge.__version__
    container = bridge_container(pod_spec(render()))
    assert container["image"] == f"events-bridge:{bridge.__version__}"
    assert container["imagePullPolicy"] == "IfNotPresent"


@pytest.mark.parametrize(
    "values_file", [None, "sidecar-values.yaml", "native-sidecar-values.yaml", "https-values.yaml"]
)
def test_lint_strict_finds_nothing(values_file: str | None) -> None:
    values = ci_values(values_file) if values_file else None
    report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{KUBERNETES}")
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; 1 (info: "icon is recommended") is advice.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_renderings_are_valid_kubernetes_1_33(values: dict[str, Any]) -> None:
    validate(render(values))


def test_lint_strict_finds_nothing_with_a_journal() -> None:
    values = SCENARIOS["journal-persistence"]
    report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{KUBERNETES}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_validator_can_fail() -> None:
    """A typo in a field must not pass silently: strict schemas reject unknown fields."""
    manifests = render()
    bridge_container(pod_spec(manifests))["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(pytest.fail.Exception, match="readinesProbe"):
        validate(manifests)


def test_default_rendering_is_a_hardened_deployment() -> None:
    manifests = render()
    assert kinds(manifests) == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    spec = pod_spec(manifests)
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,  # makes a PersistentVolume writable by the daemon's group
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert spec["automountServiceAccountToken"] is False
    assert "hostNetwork" not in spec
    container = bridge_container(spec)
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["args"] == ["serve", "--config", "/etc/events-bridge/bridge.yaml"]
    assert container["resources"]["requests"]["memory"] == "128Mi"
    assert "memory" in container["resources"]["limits"]


def test_writable_paths_are_volumes() -> None:
    """Read-only root: the outbox and /tmp (used by --workers) are the only writable mounts."""
    spec = pod_spec(render())
    mounts = {m["mountPath"]: m for m in bridge_container(spec)["volumeMounts"]}
    assert set(mounts) == {"/etc/events-bridge", "/var/lib/events-bridge/outbox", "/tmp"}
    assert mounts["/etc/events-bridge"]["readOnly"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/var/lib/events-bridge/outbox"]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    env = env_of(bridge_container(spec))
    assert env["BRIDGE_OUTBOX_DIR"] == "/var/lib/events-bridge/outbox"


@pytest.mark.parametrize(
    ("port", "service_port"), [(8080, 8080), (9090, 80)], ids=["default", "moved"]
)
def test_probes_and_service_follow_the_port(port: int, service_port: int) -> None:
    manifests = render({"bridge": {"port": port}, "service": {"port": service_port}})
    container = bridge_container(pod_spec(manifests))
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert container["ports"] == [{"name": "bridge-http", "containerPort": port, "protocol": "TCP"}]
    assert env_of(container)["BRIDGE_PORT"] == str(port)
    (service_port_spec,) = only(manifests, "Service")["spec"]["ports"]
    assert (service_port_spec["port"], service_port_spec["targetPort"]) == (service_port, port)


@pytest.mark.parametrize(
    ("bridge_values", "expected"),
    [
        ({}, 5 + 20 + 10 + 5),
        ({"shutdownTimeout": 45, "drainSeconds": 30}, 5 + 45 + 30 + 5),
        ({"shutdownTimeout": 7, "drainSeconds": 3, "preStopSleepSeconds": 0}, 7 + 3 + 5),
        ({"gracePeriodMarginSeconds": 0, "preStopSleepSeconds": 12}, 12 + 20 + 10),
    ],
    ids=["default", "long", "short-no-prestop", "no-margin"],
)
def test_grace_period_covers_shutdown_and_drain(
    bridge_values: dict[str, int], expected: int
) -> None:
    spec = pod_spec(render({"bridge": bridge_values}))
    container = bridge_container(spec)
    env = env_of(container)
    shutdown, drain = int(env["BRIDGE_SHUTDOWN_TIMEOUT"]), int(env["BRIDGE_DRAIN_SECONDS"])
    assert shutdown == bridge_values.get("shutdownTimeout", 20)
    assert drain == bridge_values.get("drainSeconds", 10)
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert sleep == bridge_values.get("preStopSleepSeconds", 5)
    assert spec["terminationGracePeriodSeconds"] == expected
    assert spec["terminationGracePeriodSeconds"] >= sleep + shutdown + drain
    if sleep == 0:  # the sleep action needs 1.30; 0 leaves the whole hook out
        assert "lifecycle" not in container


def test_grace_period_in_sidecar_pods() -> None:
    """A native sidecar stops after the app, so their times add up; regular ones stop together."""
    native = ci_values("native-sidecar-values.yaml")
    native["sidecar"]["appStopSeconds"] = 25
    assert pod_spec(render(native))["terminationGracePeriodSeconds"] == 25 + 40
    regular = ci_values("sidecar-values.yaml")
    regular["sidecar"]["appStopSeconds"] = 25
    assert pod_spec(render(regular))["terminationGracePeriodSeconds"] == 40
    regular["sidecar"]["appStopSeconds"] = 90
    assert pod_spec(render(regular))["terminationGracePeriodSeconds"] == 90


def test_config_map_holds_the_shipped_config() -> None:
    shipped = (ROOT / "config" / "bridge.yaml").read_bytes()
    assert (CHART / "files" / "bridge.yaml").read_bytes() == shipped, (
        "deploy/helm/events-bridge/files/bridge.yaml differs from config/bridge.yaml: copy it over"
    )
    manifests = render()
    assert only(manifests, "ConfigMap")["data"]["bridge.yaml"] == shipped.decode()
    spec = pod_spec(manifests)
    (config_volume,) = [v for v in spec["volumes"] if "configMap" in v]
    assert config_volume["configMap"]["name"] == only(manifests, "ConfigMap")["metadata"]["name"]


@pytest.mark.parametrize(
    "own",
    ["server:\n  port: 8080\nroutes: []\n", {"server": {"port": 8080}, "routes": []}],
    ids=["text", "map"],
)
def test_operator_config_replaces_the_shipped_one(own: str | dict[str, Any]) -> None:
    data = only(render({"config": {"bridgeYaml": own}}), "ConfigMap")["data"]["bridge.yaml"]
    if isinstance(own, str):
        assert data == own
    else:
        assert yaml.safe_load(data) == own


def checksum(values: dict[str, Any]) -> str:
    annotations = workload(render(values))["spec"]["template"]["metadata"]["annotations"]
    value = annotations["checksum/config"]
    assert isinstance(value, str)
    return value


def test_config_checksum_rolls_the_pods_when_the_config_changes() -> None:
    shipped = (ROOT / "config" / "bridge.yaml").read_text()
    assert checksum({}) == hashlib.sha256(shipped.encode()).hexdigest()
    assert checksum({}) == checksum({"replicaCount": 5})  # other values do not roll the pods
    changed = shipped.replace("level: info", "level: debug")
    assert checksum({"config": {"bridgeYaml": changed}}) != checksum({})
    assert checksum({"config": {"bridgeYaml": changed}}) == checksum(
        {"config": {"bridgeYaml": changed}}
    )


def secret_ref(name: str, key: str) -> dict[str, Any]:
    return {"secretKeyRef": {"name": name, "key": key}}


def test_credentials_come_from_the_release_secret_by_default() -> None:
    manifests = render(release="prod")
    env = env_of(bridge_container(pod_spec(manifests)))
    assert env["BRIDGE_AMQP_URL"] == secret_ref("prod-events-bridge", "amqp-url")
    assert env["BRIDGE_CLIENT_IDS"] == secret_ref("prod-events-bridge", "client-ids")
    assert "Secret" not in kinds(manifests)  # the operator creates it (NOTES.txt says how)


def test_existing_secret_with_own_key_names() -> None:
    values = {"secret": {"existingSecret": "adobe", "amqpUrlKey": "url", "clientIdsKey": "ids"}}
    manifests = render(values)
    env = env_of(bridge_container(pod_spec(manifests)))
    assert env["BRIDGE_AMQP_URL"] == secret_ref("adobe", "url")
    assert env["BRIDGE_CLIENT_IDS"] == secret_ref("adobe", "ids")
    assert "Secret" not in kinds(manifests)


def test_plain_client_ids_leave_the_broker_url_in_the_secret() -> None:
    env = env_of(bridge_container(pod_spec(render({"bridge": {"clientIds": "a,b"}}))))
    assert env["BRIDGE_CLIENT_IDS"] == "a,b"
    assert env["BRIDGE_AMQP_URL"] == secret_ref(RELEASE, "amqp-url")


def test_quick_start_secret_is_created_and_rolls_the_pods() -> None:
    values = SCENARIOS["secret-created"]
    manifests = render(values)
    secret = only(manifests, "Secret")
    assert secret["stringData"] == {"amqp-url": "amqp://u:p@rabbit:5672/", "client-ids": "a,b"}
    env = env_of(bridge_container(pod_spec(manifests)))
    assert env["BRIDGE_AMQP_URL"] == secret_ref(secret["metadata"]["name"], "amqp-url")
    annotations = workload(manifests)["spec"]["template"]["metadata"]["annotations"]
    rotated = {"secret": {**values["secret"], "amqpUrl": "amqp://u:new@rabbit:5672/"}}
    rotated_annotations = workload(render(rotated))["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/secret"] != rotated_annotations["checksum/secret"]


def test_env_names_the_daemon_reads() -> None:
    values = {"bridge": {"env": {"OTEL_SERVICE_NAME": "bridge-eu", "BRIDGE_LOG_FORMAT": "console"}}}
    env = env_of(bridge_container(pod_spec(render(values))))
    assert env["OTEL_SERVICE_NAME"] == "bridge-eu"
    assert env["BRIDGE_LOG_FORMAT"] == "console"  # the operator's value replaces the chart's
    assert env["BRIDGE_KEY_BASE_URL"] == "https://static.adobeioevents.com"
    assert env["BRIDGE_HOST"] == "0.0.0.0"


def test_workers_flag() -> None:
    container = bridge_container(pod_spec(render({"bridge": {"workers": 3}})))
    assert container["args"][-2:] == ["--workers", "3"]


def test_persistence_renders_a_statefulset_with_a_claim_per_replica() -> None:
    manifests = render(SCENARIOS["persistence"])
    assert "Deployment" not in kinds(manifests)
    statefulset = only(manifests, "StatefulSet")
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    spec = statefulset["spec"]["template"]["spec"]
    (outbox,) = [
        m
        for m in bridge_container(spec)["volumeMounts"]
        if m["mountPath"] == "/var/lib/events-bridge/outbox"
    ]
    assert outbox["name"] == claim["metadata"]["name"]
    assert outbox["name"] not in {v["name"] for v in spec["volumes"]}  # the claim, not a volume
    headless = [m for m in manifests if m["kind"] == "Service" and m["spec"].get("clusterIP")]
    assert [s["metadata"]["name"] for s in headless] == [statefulset["spec"]["serviceName"]]


def test_existing_claim_is_one_deployment_replica_recreated() -> None:
    manifests = render(SCENARIOS["existing-claim"])
    assert "StatefulSet" not in kinds(manifests)
    deployment = only(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # The volume (ReadWriteOnce) and the outbox lock allow one daemon: no surge.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    claims = [
        v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v
    ]
    assert claims == ["bridge-outbox"]


def test_default_deployment_surges_instead_of_dropping_capacity() -> None:
    strategy = only(render(), "Deployment")["spec"]["strategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }


def test_selectors_match_the_pods() -> None:
    manifests = render(SCENARIOS["persistence"])
    labels = workload(manifests)["spec"]["template"]["metadata"]["labels"]
    selectors = [
        *(s["spec"]["selector"] for s in manifests if s["kind"] == "Service"),
        only(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        workload(manifests)["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items()
    assert only(manifests, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_sidecar_as_a_regular_container_for_podman() -> None:
    spec = pod_spec(render(ci_values("sidecar-values.yaml")))
    assert [c["name"] for c in spec["containers"]] == ["consumer", "events-bridge"]
    assert "initContainers" not in spec  # podman 4.3 wants OnFailure as soon as there are some
    consumer = spec["containers"][0]
    assert consumer["image"] == f"localhost/events-bridge:{bridge.__version__}"  # through `tpl`
    assert consumer["command"] == [
        "/opt/events-bridge/bin/python",
        "/opt/events-bridge/examples/consumer.py",
    ]
    container = bridge_container(spec)
    assert "restartPolicy" not in container
    # podman 4.3 refuses declared ports on the host network; the probes use the number.
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert "ports" not in container
    assert container["readinessProbe"]["httpGet"]["port"] == 8080
    env = env_of(container)
    assert env["BRIDGE_AMQP_URL"] == "amqp://guest:guest@127.0.0.1:5672/"  # podman plays no Secret
    assert env["BRIDGE_CLIENT_IDS"] == "events-bridge-dev"
    assert container["image"] == f"localhost/events-bridge:{bridge.__version__}"


def test_sidecar_native_is_an_init_container_that_keeps_running() -> None:
    spec = pod_spec(render(ci_values("native-sidecar-values.yaml")))
    assert [c["name"] for c in spec["initContainers"]] == ["events-bridge"]
    assert spec["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["consumer"]
    assert "hostNetwork" not in spec
    assert "restartPolicy" not in spec  # a Deployment's Pods restart Always


def test_sidecar_keeps_the_apps_own_init_containers_and_volumes() -> None:
    values = ci_values("native-sidecar-values.yaml")
    values["sidecar"]["initContainers"] = [{"name": "migrate", "image": "app:1"}]
    values["sidecar"]["volumes"] = [{"name": "cache", "emptyDir": {}}]
    values["restartPolicy"] = "OnFailure"  # what podman 4.3 wants with initContainers
    spec = pod_spec(render(values))
    # The bridge first: it runs, and can take events, before the app's own init steps.
    assert [c["name"] for c in spec["initContainers"]] == ["events-bridge", "migrate"]
    assert "cache" in {v["name"] for v in spec["volumes"]}
    assert spec["restartPolicy"] == "OnFailure"


def test_service_monitor() -> None:
    values = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}}}
    manifests = render(values)
    # A CRD: no schema in kubernetes-validate, so everything else is validated and it by hand.
    validate(manifests, skip=frozenset({"ServiceMonitor"}))
    monitor = only(manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    service = only(manifests, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert set(endpoint) == {"port", "path", "interval", "scrapeTimeout"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"persistence": {"existingClaim": "c"}}, "set replicaCount=1"),
        ({"secret": {"create": True, "existingSecret": "s", "amqpUrl": "u"}}, "choose one"),
        ({"secret": {"create": True, "clientIds": "a"}}, "needs secret.amqpUrl"),
        ({"secret": {"create": True, "amqpUrl": "u"}}, "needs secret.clientIds"),
        ({"sidecar": {"enabled": True}}, "needs sidecar.containers"),
        ({"bridge": {"env": {"BRIDGE_DRAIN_SECONDS": "3"}}}, "bridge.drainSeconds"),
        (
            {"tls": {"server": {"clientCa": True}}},
            "tls.server.clientCa needs tls.server.secretName",
        ),
        ({"tls": {"broker": {"secretName": "s", "ca": False}}}, "set tls.broker.ca or"),
        ({"journal": {"url": "https://j"}}, "journal.url with replicaCount=2"),
        (
            {"replicaCount": 3, "journal": {"url": "https://j"}, "persistence": {"enabled": True}},
            "publish each event 3 times",
        ),
        (
            {
                "replicaCount": 1,
                "journal": {"url": "https://j"},
                "secret": {"create": True, "amqpUrl": "u", "clientIds": "a"},
            },
            "name it in journal.ims.existingSecret",
        ),
    ],
    ids=[
        "claim-replicas",
        "two-secrets",
        "no-url",
        "no-ids",
        "no-app",
        "drain-in-env",
        "mtls-without-https",
        "broker-secret-unused",
        "journal-replicas",
        "journal-replicas-persistent",
        "journal-created-secret",
    ],
)
def test_values_that_cannot_work_fail_the_render(values: dict[str, Any], message: str) -> None:
    assert message in render_error(values)


# -- TLS (SPEC §8): each side from a Secret, mounted read-only; the probes follow HTTPS ----------

SHIPPED_VARIABLES = set(
    re.findall(r"\$\{(BRIDGE_[A-Z_]+)", (ROOT / "config/bridge.yaml").read_text())
)


def tls_mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container["volumeMounts"] if "/ssl/" in m["mountPath"]}


def test_https_on_the_webhook_port_from_a_tls_secret() -> None:
    manifests = render({"tls": {"server": {"secretName": "webhook-tls"}}})
    spec = pod_spec(manifests)
    container = bridge_container(spec)
    env = env_of(container)
    assert env["BRIDGE_TLS_CERT_FILE"] == "/etc/ssl/events-bridge/server/tls.crt"
    assert env["BRIDGE_TLS_KEY_FILE"] == "/etc/ssl/events-bridge/server/tls.key"
    assert "BRIDGE_TLS_CLIENT_CA_FILE" not in env
    assert not {name for name in env if name.startswith("BRIDGE_AMQP_") and name.endswith("_FILE")}
    (mount,) = tls_mounts(container).values()
    assert (mount["mountPath"], mount["readOnly"]) == ("/etc/ssl/events-bridge/server", True)
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    assert volume["secret"] == {"secretName": "webhook-tls", "defaultMode": 0o440}
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": 8080, "scheme": "HTTPS"}
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    notes = helm_python.Chart.load(CHART).render(
        {"tls": {"server": {"secretName": "webhook-tls"}}}, name=RELEASE, namespace="ns"
    )
    assert "HTTPS" in next(text for path, text in notes.items() if path.endswith("NOTES.txt"))


def test_mtls_asks_for_client_certificates_and_the_probes_present_one() -> None:
    """kubelet's HTTP probes cannot show a client certificate: under mTLS they run the image's
    healthcheck, which presents the Secret's probe certificate over HTTPS."""
    values = {"tls": {"server": {"secretName": "webhook-tls", "clientCa": True}}}
    container = bridge_container(pod_spec(render(values)))
    env = env_of(container)
    assert env["BRIDGE_TLS_CLIENT_CA_FILE"] == "/etc/ssl/events-bridge/server/ca.crt"
    assert env["BRIDGE_HEALTHCHECK_CERT_FILE"] == "/etc/ssl/events-bridge/server/probe.crt"
    assert env["BRIDGE_HEALTHCHECK_KEY_FILE"] == "/etc/ssl/events-bridge/server/probe.key"
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert "httpGet" not in container[probe]
        assert container[probe]["exec"]["command"] == [
            "/usr/local/bin/events-bridge-healthcheck",
            path,
        ]
    healthcheck = (ROOT / "deploy" / "container" / "healthcheck").read_text()
    assert all(name in healthcheck for name in env if name.startswith("BRIDGE_HEALTHCHECK_"))


@pytest.mark.parametrize(
    ("broker", "expected"),
    [
        ({}, {"BRIDGE_AMQP_CA_FILE": "ca.crt"}),
        (
            {"clientCertificate": True},
            {"BRIDGE_AMQP_CA_FILE": "ca.crt", "BRIDGE_AMQP_CERT_FILE": "tls.crt"}
            | {"BRIDGE_AMQP_KEY_FILE": "tls.key"},
        ),
        (
            {"ca": False, "clientCertificate": True},
            {"BRIDGE_AMQP_CERT_FILE": "tls.crt", "BRIDGE_AMQP_KEY_FILE": "tls.key"},
        ),
    ],
    ids=["ca", "ca-and-client-certificate", "client-certificate-system-cas"],
)
def test_broker_tls_files_come_from_a_secret(
    broker: dict[str, Any], expected: dict[str, str]
) -> None:
    spec = pod_spec(render({"tls": {"broker": {"secretName": "amqp-tls", **broker}}}))
    container = bridge_container(spec)
    env = env_of(container)
    found = {k: v for k, v in env.items() if k.startswith("BRIDGE_AMQP_") and k.endswith("_FILE")}
    assert found == {k: f"/etc/ssl/events-bridge/broker/{v}" for k, v in expected.items()}
    assert "BRIDGE_TLS_CERT_FILE" not in env
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    (mount,) = tls_mounts(container).values()
    assert mount["readOnly"] is True
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    assert volume["secret"]["secretName"] == "amqp-tls"


def test_tls_variables_are_the_ones_the_shipped_config_reads() -> None:
    values = {
        "tls": {
            "server": {"secretName": "w", "clientCa": True},
            "broker": {"secretName": "b", "clientCertificate": True},
        }
    }
    env = env_of(bridge_container(pod_spec(render(values))))
    files = {name for name in env if name.endswith("_FILE")}
    assert len(files) == 8
    assert files - {"BRIDGE_HEALTHCHECK_CERT_FILE", "BRIDGE_HEALTHCHECK_KEY_FILE"} <= (
        SHIPPED_VARIABLES
    )


def test_an_operators_env_replaces_a_tls_variable() -> None:
    values = {
        "tls": {"server": {"secretName": "w"}},
        "bridge": {"env": {"BRIDGE_TLS_CERT_FILE": "/etc/ssl/events-bridge/server/chain.pem"}},
    }
    env = env_of(bridge_container(pod_spec(render(values))))
    assert env["BRIDGE_TLS_CERT_FILE"] == "/etc/ssl/events-bridge/server/chain.pem"


def test_service_monitor_scrapes_https_when_the_pods_serve_it() -> None:
    tls_config = {"ca": {"secret": {"name": "webhook-tls", "key": "ca.crt"}}, "serverName": "x"}
    values = {
        "tls": {"server": {"secretName": "webhook-tls"}},
        "metrics": {"serviceMonitor": {"enabled": True, "tlsConfig": tls_config}},
    }
    (endpoint,) = only(render(values), "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == tls_config


# -- the journal (SPEC §10): off by default; its position on the outbox's volume; one reader ----

JOURNAL = "/var/lib/events-bridge/journal"
JOURNAL_URL = "https://events.adobe.io/events/organizations/1/integrations/2/r"


def journal_mount(container: dict[str, Any]) -> dict[str, Any]:
    (found,) = [m for m in container["volumeMounts"] if m["mountPath"] == JOURNAL]
    assert isinstance(found, dict)
    return found


def outbox_mount(container: dict[str, Any]) -> dict[str, Any]:
    (found,) = [
        m for m in container["volumeMounts"] if m["mountPath"] == "/var/lib/events-bridge/outbox"
    ]
    assert isinstance(found, dict)
    return found


def test_no_journal_by_default() -> None:
    for values in ({}, SCENARIOS["persistence"], ci_values("native-sidecar-values.yaml")):
        container = bridge_container(pod_spec(render(values)))
        env = env_of(container)
        assert not {n for n in env if n.startswith(("BRIDGE_JOURNAL_", "BRIDGE_IMS_"))}
        assert JOURNAL not in {m["mountPath"] for m in container["volumeMounts"]}


def test_journal_variables_and_the_credential_from_the_release_secret() -> None:
    manifests = render(SCENARIOS["journal-persistence"], release="prod")
    env = env_of(bridge_container(pod_spec(manifests)))
    assert env["BRIDGE_JOURNAL_URL"] == JOURNAL_URL
    assert env["BRIDGE_JOURNAL_START"] == "latest"
    assert env["BRIDGE_JOURNAL_STATE_DIR"] == JOURNAL
    assert env["BRIDGE_IMS_CLIENT_ID"] == secret_ref("prod-events-bridge", "ims-client-id")
    assert env["BRIDGE_IMS_CLIENT_SECRET"] == secret_ref("prod-events-bridge", "ims-client-secret")
    assert env["BRIDGE_IMS_ORG_ID"] == secret_ref("prod-events-bridge", "ims-org-id")
    assert "BRIDGE_IMS_TOKEN_URL" not in env  # the shipped config's default
    assert "BRIDGE_IMS_SCOPES" not in env
    journal_env = {n for n in env if n.startswith(("BRIDGE_JOURNAL_", "BRIDGE_IMS_"))}
    assert journal_env <= SHIPPED_VARIABLES  # names the shipped config reads
    assert "Secret" not in kinds(manifests)


def test_journal_credential_from_its_own_secret_with_own_keys() -> None:
    values = {
        "replicaCount": 1,
        "journal": {
            "url": JOURNAL_URL,
            "start": "oldest",
            "ims": {
                "existingSecret": "adobe-ims",
                "clientIdKey": "id",
                "clientSecretKey": "secret",
                "orgIdKey": "org",
                "tokenUrl": "https://ims-na1.adobelogin.com/ims/token/v3",
                "scopes": "AdobeID,openid,adobeio_api",
            },
        },
    }
    env = env_of(bridge_container(pod_spec(render(values))))
    assert env["BRIDGE_IMS_CLIENT_ID"] == secret_ref("adobe-ims", "id")
    assert env["BRIDGE_IMS_CLIENT_SECRET"] == secret_ref("adobe-ims", "secret")
    assert env["BRIDGE_IMS_ORG_ID"] == secret_ref("adobe-ims", "org")
    assert env["BRIDGE_AMQP_URL"] == secret_ref(RELEASE, "amqp-url")  # the broker's stays
    assert env["BRIDGE_JOURNAL_START"] == "oldest"
    assert env["BRIDGE_IMS_TOKEN_URL"] == "https://ims-na1.adobelogin.com/ims/token/v3"
    assert env["BRIDGE_IMS_SCOPES"] == "AdobeID,openid,adobeio_api"


def test_an_operators_env_replaces_a_journal_variable() -> None:
    values = {
        "replicaCount": 1,
        "journal": {"url": JOURNAL_URL},
        "bridge": {"env": {"BRIDGE_IMS_CLIENT_ID": "plain-id", "BRIDGE_JOURNAL_START": "oldest"}},
    }
    env = env_of(bridge_container(pod_spec(render(values))))
    assert env["BRIDGE_IMS_CLIENT_ID"] == "plain-id"
    assert env["BRIDGE_JOURNAL_START"] == "oldest"
    assert env["BRIDGE_IMS_CLIENT_SECRET"] == secret_ref(RELEASE, "ims-client-secret")


def test_journal_position_on_each_replicas_claim() -> None:
    """With persistence the position is the folder `journal` of the replica's own claim: it
    survives new pods with the outbox, and the StatefulSet keeps one volumeClaimTemplate (those
    cannot change on an existing StatefulSet, so a second claim would break upgrades)."""
    manifests = render(SCENARIOS["journal-persistence"])
    statefulset = only(manifests, "StatefulSet")
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    spec = statefulset["spec"]["template"]["spec"]
    container = bridge_container(spec)
    mount = journal_mount(container)
    assert mount == {"name": claim["metadata"]["name"], "mountPath": JOURNAL, "subPath": "journal"}
    assert outbox_mount(container)["name"] == mount["name"]
    assert "readOnly" not in mount
    assert env_of(container)["BRIDGE_JOURNAL_STATE_DIR"] == mount["mountPath"]
    notes = helm_python.Chart.load(CHART).render(
        SCENARIOS["journal-persistence"], name=RELEASE, namespace="ns"
    )
    text = next(text for path, text in notes.items() if path.endswith("NOTES.txt"))
    assert "on the outbox's claim" in text


def test_journal_position_on_an_existing_claim() -> None:
    values = {**SCENARIOS["existing-claim"], "journal": {"url": JOURNAL_URL}}
    deployment = only(render(values), "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    mount = journal_mount(bridge_container(spec))
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "bridge-outbox"
    assert mount["subPath"] == "journal"
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # never two readers


def test_journal_position_without_persistence_is_on_the_emptydir_and_notes_say_so() -> None:
    values = SCENARIOS["journal-emptydir-own-secret"]
    spec = pod_spec(render(values))
    mount = journal_mount(bridge_container(spec))
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    assert "emptyDir" in volume
    notes = helm_python.Chart.load(CHART).render(values, name=RELEASE, namespace="ns")
    text = next(text for path, text in notes.items() if path.endswith("NOTES.txt"))
    assert "a new pod starts again at -PT2H" in text
    assert "persistence.enabled=true" in text


def test_journal_in_a_sidecar_pod() -> None:
    values = {**ci_values("native-sidecar-values.yaml"), "journal": {"url": JOURNAL_URL}}
    values["secret"] = {**values.get("secret", {}), "existingSecret": "events-bridge-broker"}
    spec = pod_spec(render(values))
    container = bridge_container(spec)
    assert container["restartPolicy"] == "Always"
    assert journal_mount(container)["subPath"] == "journal"
    org = env_of(container)["BRIDGE_IMS_ORG_ID"]
    assert org == secret_ref("events-bridge-broker", "ims-org-id")


def test_journal_with_replicas_only_when_allowed() -> None:
    manifests = render(SCENARIOS["journal-replicas-allowed"])
    statefulset = only(manifests, "StatefulSet")
    assert statefulset["spec"]["replicas"] == 2
    container = bridge_container(statefulset["spec"]["template"]["spec"])
    assert journal_mount(container)["subPath"] == "journal"
