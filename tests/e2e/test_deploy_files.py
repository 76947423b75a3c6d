"""The deployment files an operator applies: Kubernetes manifests validate
against the Kubernetes schemas, docker-compose accepts the compose file, the
Dockerfile keeps its promises."""

import pathlib
import re
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
    assert c["livenessProbe"]["exec"]["command"] == ["gemini-balancer", "healthcheck"], \
        "liveness uses the image's health check"
    assert c["resources"]["limits"] and c["resources"]["requests"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    grace = int(yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]["GB_SHUTDOWN_GRACE"])
    assert pod["terminationGracePeriodSeconds"] > grace + 5 - 1, "preStop + grace fit the pod's grace period"


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


def render_kustomization():
    """What `kubectl kustomize k8s/` does with this kustomization: every
    resource, namespaced, images rewritten by `images:`."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kust) <= {"apiVersion", "kind", "namespace", "resources", "images"}, \
        "the rendering below knows these fields only"
    images = {i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in kust.get("images", [])}
    docs = []
    for res in kust["resources"]:
        for doc in yaml.safe_load_all((K8S / res).read_text()):
            if not doc:
                continue
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kust["namespace"]
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                name = c["image"].rsplit(":", 1)[0] if ":" in c["image"].split("/")[-1] else c["image"]
                if name in images:
                    c["image"] = images[name]
            docs.append(doc)
    return docs


def test_the_rendered_kustomization_validates_and_keeps_operations_internal():
    docs = render_kustomization()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(docs, f)
        rendered = f.name
    tool = pathlib.Path(sys.executable).parent / "kubernetes-validate"
    out = subprocess.run([str(tool), "--strict", rendered], capture_output=True, text=True, timeout=300)
    pathlib.Path(rendered).unlink()
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed") >= len(docs)

    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    dep = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == "gemini-balancer")
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    # The image the Dockerfile builds and docker-compose.yml runs.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert c["image"] == compose["x-gateway"]["image"] == "gemini-balancer:latest"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    cm = next(d for d in by_kind["ConfigMap"] if d["metadata"]["name"] == "gemini-balancer")["data"]
    assert int(cm["GB_ADMIN_LISTEN"].rsplit(":", 1)[1]) == ports["admin"]
    assert int(cm["GB_LISTEN"].rsplit(":", 1)[1]) == ports["http"]
    # Prometheus scrapes the internal port.
    ann = pod["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == ports["admin"] and ann["prometheus.io/path"] == "/metrics"
    # No Service carries the internal port; the Ingress reaches the public one.
    for svc in by_kind["Service"]:
        for p in svc["spec"]["ports"]:
            assert p.get("targetPort") not in ("admin", ports["admin"]) and p["port"] != ports["admin"], svc
    svc = next(d for d in by_kind["Service"] if d["metadata"]["name"] == "gemini-balancer")
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    for ing in by_kind["Ingress"]:
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == "gemini-balancer" and backend["port"] == {"name": "http"}
    assert all(d["metadata"].get("namespace") == "gemini-balancer"
               for d in docs if d["kind"] not in CLUSTER_SCOPED)


def test_compose_keeps_operations_internal_and_wires_prometheus_there():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gw = compose["x-gateway"]
    admin_port = gw["environment"]["GB_ADMIN_LISTEN"].rsplit(":", 1)[1]
    assert gw["expose"] == [admin_port] and "ports" not in gw
    assert gw["labels"]["prometheus.io/port"] == admin_port
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"gateway-{i}:{admin_port}" for i in (1, 2, 3)}
    # The rules it evaluates are the shipped file, mounted where it looks.
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["prometheus"]["volumes"]
                  if v.startswith("./"))
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert prom["rule_files"] == [mounts["./deploy/prometheus/alerts.yml"]]
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "location = /metrics" in nginx and "location /admin" in nginx
    assert f":{admin_port}" not in nginx, "nginx proxies the public port only"


def test_k8s_monitoring_copies_equal_the_shipped_rules_and_dashboard():
    """k8s/ carries deploy/'s alert rules and dashboard unchanged (written by
    scripts/k8s-monitoring): as ConfigMaps in the kustomization, and as a
    PrometheusRule for the operator outside it."""
    rules_text = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    dashboard_text = (ROOT / "deploy" / "grafana" / "gemini-balancer.json").read_text()
    hint = "run scripts/k8s-monitoring"
    maps = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "monitoring.yaml").read_text())}
    assert maps["gemini-balancer-alerts"]["data"] == {"alerts.yml": rules_text}, hint
    dash = maps["gemini-balancer-dashboard"]
    assert dash["data"] == {"gemini-balancer.json": dashboard_text}, hint
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "monitoring.yaml" in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    rule = yaml.safe_load((K8S / "operator" / "prometheusrule.yaml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(rules_text), hint
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert rule["metadata"]["namespace"] == kust["namespace"]
    # The generator writes exactly these files from the sources.
    with tempfile.TemporaryDirectory() as d:
        copy = pathlib.Path(d)
        for f in ("scripts/k8s-monitoring", "deploy/prometheus/alerts.yml", "deploy/grafana/gemini-balancer.json"):
            (copy / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, copy / f)
        (copy / "k8s" / "operator").mkdir(parents=True)
        out = subprocess.run(["bash", str(copy / "scripts" / "k8s-monitoring")], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        for f in ("k8s/monitoring.yaml", "k8s/operator/prometheusrule.yaml"):
            assert (copy / f).read_text() == (ROOT / f).read_text(), f"{f}: {hint}"


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
        assert set(out.stdout.split()) == {"redis", "gateway-1", "gateway-2", "gateway-3", "nginx",
                                           "fake-gemini", "prometheus"}
        services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
        assert services["fake-gemini"]["profiles"] == ["demo"]
        assert services["prometheus"]["profiles"] == ["monitoring"]


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
        assert "--protected-mode no" in command, f"{n} takes connections from the other containers"
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
    assert "ARG BUILDER_IMAGE=" in text and "ARG RUNTIME_IMAGE=debian:bookworm-slim" in text
    rust_version = re.search(r'^rust-version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
    assert f"ARG BUILDER_IMAGE=rust:{rust_version}-slim-bookworm" in text, "the builder is the crate's rust-version"
    assert "AS fake" in text, "the fake upstream has its own target"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for arg, value in compose["x-build-args"].items():
        assert f"ARG {arg}={value.split(':-', 1)[1].rstrip('}')}" in text, f"compose's {arg} default is the Dockerfile's"
    assert "HEALTHCHECK" in text
    assert "GB_API_KEYS" not in text and "GB_AUTH_TOKENS" not in text, "no secrets baked in"


def test_nginx_fails_over_fast_and_never_resends_a_started_request():
    proxy = (ROOT / "deploy" / "nginx-proxy.conf").read_text()
    timeout = re.search(r"^proxy_connect_timeout (\d+)ms;", proxy, re.M)
    assert timeout and int(timeout.group(1)) < 1000, "a dead replica costs a request less than a second"
    assert re.search(r"^proxy_next_upstream error timeout;", proxy, re.M), \
        "only a replica that could not be reached is retried (not the gateway's own 502/503)"
    assert len(re.findall(r"^proxy_next_upstream ", proxy, re.M)) == 1 and "proxy_request_buffering off;" in proxy, \
        "a POST, a stream or an upload that was sent is never sent again"
    # The replicas are found at run time (nginx 1.22's upstream blocks resolve
    # once, at start): one network alias, Docker's DNS, a variable proxy_pass.
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    assert re.search(r"resolver 127\.0\.0\.11 valid=1s", nginx)
    assert "set $gateway gateway;" in nginx and "proxy_pass http://$gateway:8000;" in nginx
    assert not re.search(r"^\s*upstream ", nginx, re.M)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["x-gateway"]["networks"]["default"]["aliases"] == ["gateway"]
