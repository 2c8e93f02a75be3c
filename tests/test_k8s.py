"""The Kubernetes manifests in config/k8s: rendered with `kubectl kustomize`, checked against the API schemas.

Schemas come from kubernetes-validate, which ships them (no network). Rendering needs kubectl; without it the
render tests skip and the base's resource files are still validated one by one.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import load_settings
from gateway.supervisor import DEFAULT_DRAIN_TIMEOUT_S, STOP_MARGIN_S

K8S = Path(__file__).parent.parent / "config" / "k8s"
KUSTOMIZATIONS = ["base", "overlays/production"]
# The oldest Kubernetes still widely run, and the newest the schemas know.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version() + ".0"]
# Target policy settings arrive with issue #5 (safety); the manifests already carry them.


def render(kustomization: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` cannot render the manifests")
    rendered = subprocess.run([kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True,
                              timeout=60, check=True)
    return [document for document in yaml.safe_load_all(rendered.stdout) if document]


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [item["kind"] for item in objects]
    assert len(kinds) == len(set(kinds)), kinds  # one object of each kind
    return {item["kind"]: item for item in objects}


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> dict[str, dict[str, Any]]:
    return by_kind(render(request.param))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_matches_the_kubernetes_schema(rendered: dict[str, dict[str, Any]], version: str) -> None:
    for item in rendered.values():
        kubernetes_validate.validate(item, version, strict=True)


def test_base_resource_files_match_the_schema_without_rendering() -> None:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        for item in yaml.safe_load_all((K8S / "base" / name).read_text()):
            kubernetes_validate.validate(item, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_object_set(rendered: dict[str, dict[str, Any]]) -> None:
    assert sorted(rendered) in (
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"],
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Namespace", "PodDisruptionBudget", "Service"],
    )


def test_probes_hit_the_admin_port(rendered: dict[str, dict[str, Any]]) -> None:
    [container] = rendered["Deployment"]["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}

    assert ports == {"proxy": 8081, "admin": 8082}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}


def test_termination_grace_outlasts_pre_stop_and_drain(rendered: dict[str, dict[str, Any]]) -> None:
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {variable["name"]: variable["value"] for variable in container["env"]}
    [sleep, seconds] = container["lifecycle"]["preStop"]["exec"]["command"]

    assert (sleep, float(env["GATEWAY_DRAIN_TIMEOUT"])) == ("sleep", DEFAULT_DRAIN_TIMEOUT_S)
    assert pod["terminationGracePeriodSeconds"] > int(seconds) + DEFAULT_DRAIN_TIMEOUT_S + STOP_MARGIN_S


def test_workers_match_the_cpu_limit(rendered: dict[str, dict[str, Any]]) -> None:
    [container] = rendered["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {variable["name"]: variable["value"] for variable in container["env"]}
    resources = container["resources"]

    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == env["GATEWAY_WORKERS"]


def test_pods_run_as_non_root_without_privileges(rendered: dict[str, dict[str, Any]]) -> None:
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]

    assert (pod["securityContext"]["runAsNonRoot"], pod["securityContext"]["runAsUser"]) == (True, 10001)
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_service_autoscaler_and_budget_select_the_gateway_pods(rendered: dict[str, dict[str, Any]]) -> None:
    pod_labels = rendered["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service, budget = rendered["Service"], rendered["PodDisruptionBudget"]
    autoscaler = rendered["HorizontalPodAutoscaler"]

    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service_ports = [(port["port"], port["targetPort"]) for port in service["spec"]["ports"]]
    assert service_ports == [(8081, "proxy"), (8082, "admin")]
    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": rendered["Deployment"]["metadata"]["name"],
    }
    [cpu] = autoscaler["spec"]["metrics"]
    assert (cpu["type"], cpu["resource"]["name"]) == ("Resource", "cpu")
    assert autoscaler["spec"]["minReplicas"] >= 2


def test_prometheus_scrapes_the_admin_port(rendered: dict[str, dict[str, Any]]) -> None:
    annotations = rendered["Deployment"]["spec"]["template"]["metadata"]["annotations"]

    assert annotations == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "8082", "prometheus.io/path": "/metrics",
    }


def test_config_map_holds_valid_settings_and_a_target_allow_list(
    rendered: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    config_map = rendered["ConfigMap"]
    volumes = rendered["Deployment"]["spec"]["template"]["spec"]["volumes"]
    [volume] = [volume for volume in volumes if "configMap" in volume]
    table = tomllib.loads(config_map["data"]["gateway.toml"])

    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert table["target_allow"] == ["10.0.0.0/8:8081"]
    config = tmp_path / "gateway.toml"
    config.write_text(config_map["data"]["gateway.toml"])
    tokens = tmp_path / "tokens"  # the token file a Secret mounts in production (below)
    tokens.write_text("token\n")
    settings = load_settings(["--config", str(config), "--auth-token-file", str(tokens)], {})
    assert (settings.port, settings.admin_port, settings.schedule_type, settings.target_allow) == (
        8081, 8082, "k8s", ("10.0.0.0/8:8081",))


def test_production_mounts_the_tls_and_token_secrets_where_its_settings_read_them(tmp_path: Path) -> None:
    rendered = by_kind(render("overlays/production"))
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    secrets = {volume["name"]: volume["secret"]["secretName"] for volume in pod["volumes"] if "secret" in volume}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    table = tomllib.loads(rendered["ConfigMap"]["data"]["gateway.toml"])
    read = {name: Path(table[name]) for name in ("tls_cert", "tls_key", "auth_token_file")}

    assert secrets == {"tls": "mcp-gateway-tls", "tokens": "mcp-gateway-tokens"}
    for name, path in read.items():
        mount = mounts[str(path.parent)]
        assert mount["name"] in secrets, name
        # A subPath mount is never updated when its Secret changes: rotation needs the whole directory.
        assert (mount["readOnly"], "subPath" in mount) == (True, False), name
    assert (read["tls_cert"].name, read["tls_key"].name) == ("tls.crt", "tls.key")  # a kubernetes.io/tls Secret
    assert table["watch_interval_s"] > 0  # a rotated Secret reaches the pods without a restart

    # The same settings pass the startup checks (--check-config) with such files in those places.
    from gateway.configuration import load_configuration
    from tests.certs import Authority

    ca = Authority.create(tmp_path, "ca")
    issued = ca.issue("server", server=True)
    files = {"tls_cert": issued.cert.read_text(), "tls_key": issued.key.read_text(), "auth_token_file": "t\n"}
    text = rendered["ConfigMap"]["data"]["gateway.toml"]
    for name, path in read.items():
        local = tmp_path / path.relative_to("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(files[name])
        text = text.replace(f'"{path}"', f'"{local}"')
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    configuration = load_configuration(["--config", str(config)], {})
    assert (configuration.tls is not None, configuration.tokens) == (True, ("t",))
