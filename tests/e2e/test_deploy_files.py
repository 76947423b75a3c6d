"""The deployment files an operator applies: Kubernetes manifests validate
against the Kubernetes schemas, docker-compose accepts the compose file, the
Dockerfile keeps its promises."""

import pathlib
import shutil
import subprocess
import sys
import tempfile

import yaml

from conftest import ROOT

K8S = ROOT / "k8s"


def test_every_manifest_validates_against_the_kubernetes_schemas():
    manifests = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    tool = pathlib.Path(sys.executable).parent / "kubernetes-validate"
    out = subprocess.run([str(tool), "--strict", *map(str, manifests)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed") >= len(manifests)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_deployment_matches_the_gateway_contract():
    docs = {d["kind"]: d for d in yaml.safe_load_all((K8S / "deployment.yaml").read_text())}
    spec = docs["Deployment"]["spec"]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    assert spec["replicas"] == 3
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["limits"] and c["resources"]["requests"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    grace = int(yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]["GB_SHUTDOWN_GRACE"])
    assert pod["terminationGracePeriodSeconds"] > grace + 5 - 1, "preStop + grace fit the pod's grace period"


def test_docker_compose_accepts_the_compose_file():
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose is installed by scripts/test"
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(ROOT / "docker-compose.yml", d)
        shutil.copytree(ROOT / "deploy", pathlib.Path(d) / "deploy")
        shutil.copy(ROOT / ".env.example", pathlib.Path(d) / ".env")
        out = subprocess.run([tool, "config", "-q"], cwd=d, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        out = subprocess.run([tool, "--profile", "demo", "config", "--services"], cwd=d,
                             capture_output=True, text=True, timeout=120)
        assert set(out.stdout.split()) == {"redis", "gateway-1", "gateway-2", "gateway-3", "nginx", "fake-gemini"}


def test_docker_compose_cluster_override_puts_the_stack_on_a_six_node_cluster():
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose is installed by scripts/test"
    with tempfile.TemporaryDirectory() as d:
        for f in ("docker-compose.yml", "docker-compose.cluster.yml"):
            shutil.copy(ROOT / f, d)
        shutil.copytree(ROOT / "deploy", pathlib.Path(d) / "deploy")
        shutil.copy(ROOT / ".env.example", pathlib.Path(d) / ".env")
        files = ["-f", "docker-compose.yml", "-f", "docker-compose.cluster.yml"]
        out = subprocess.run([tool, *files, "config"], cwd=d, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    services = cfg["services"]
    nodes = ["redis"] + [f"redis-{i}" for i in range(2, 7)]
    for n in nodes:
        command = " ".join(services[n]["command"])
        assert "--cluster-enabled yes" in command, n
    init = " ".join(services["redis-cluster-init"]["command"])
    assert "--cluster-create" not in init and "--cluster create" in init and "--cluster-replicas 1" in init
    for gw in ("gateway-1", "gateway-2", "gateway-3"):
        env = services[gw]["environment"]
        assert env["GB_REDIS_MODE"] == "cluster"
        assert env["GB_REDIS_URL"].split(",") == [f"redis://{n}:6379" for n in nodes]
        assert "redis-cluster-init" in services[gw]["depends_on"]


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") >= 2
    assert "USER 10001" in text
    assert "HEALTHCHECK" in text
    assert "GB_API_KEYS" not in text and "GB_AUTH_TOKENS" not in text, "no secrets baked in"
