#!/usr/bin/env python3
"""Cross-file checks of deploy/ that no off-the-shelf validator does. Called by deploy/check.sh, one check per call:

    python deploy/checks.py CHECK [ARGS...]

Each check prints what it looked at and exits 1 with one line per problem. Needs PyYAML (the check venv has it) and
Python >= 3.11 (tomllib). Paths are relative to the repository root, the working directory check.sh sets.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

DEPLOY = Path("deploy")
METRICS_FILE = DEPLOY / "metrics.txt"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
PROM_COMPOSE = DEPLOY / "prometheus" / "prometheus.yml"
PROM_K8S = DEPLOY / "prometheus" / "prometheus-kubernetes.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "license-sync.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "k8s"
README = DEPLOY / "README.md"
SEVERITIES = {"critical", "warning", "info"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def finish(self, what: str) -> int:
        if self.items:
            for item in self.items:
                print(f"  - {item}", file=sys.stderr)
            print(f"{what}: {len(self.items)} problem(s)", file=sys.stderr)
            return 1
        print(f"{what}: ok")
        return 0


def load_yaml(path: Path):
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def load_yaml_all(path: Path) -> list:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


# ---------------------------------------------------------------------------------------------------------------------
# metrics.txt and the metric names used by alerts, alert tests and the dashboard


def read_metrics() -> dict[str, str]:
    """name -> type, from deploy/metrics.txt (`name type`, comments with #)."""
    metrics: dict[str, str] = {}
    for number, raw in enumerate(METRICS_FILE.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in {"counter", "gauge", "histogram"}:
            raise SystemExit(f"{METRICS_FILE}:{number}: expected `name counter|gauge|histogram`, got {raw!r}")
        name, kind = parts
        if not re.fullmatch(r"license_sync_[a-z0-9_]+", name):
            raise SystemExit(f"{METRICS_FILE}:{number}: {name!r} is not a license_sync_* metric name")
        if kind == "counter" and not name.endswith("_total"):
            raise SystemExit(f"{METRICS_FILE}:{number}: counter {name} must carry its _total suffix")
        if name in metrics:
            raise SystemExit(f"{METRICS_FILE}:{number}: {name} listed twice")
        metrics[name] = kind
    return metrics


METRIC_TOKEN = re.compile(r"\blicense_sync_[a-z0-9_]*[a-z0-9]\b")


def check_metrics() -> int:
    problems = Problems()
    metrics = read_metrics()
    used: dict[str, set[str]] = {}
    for path in (ALERTS, ALERTS_TEST, DASHBOARD):
        for token in METRIC_TOKEN.findall(path.read_text(encoding="utf-8")):
            used.setdefault(token, set()).add(str(path))
    families_used = set()
    for name, files in sorted(used.items()):
        where = ", ".join(sorted(files))
        if name in metrics:
            if metrics[name] == "histogram":
                problems.add(f"{name} ({where}) is a histogram: use {name}_bucket, _sum or _count")
            families_used.add(name)
            continue
        suffix = next((s for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        base = name[: -len(suffix)] if suffix else None
        if base and metrics.get(base) == "histogram":
            families_used.add(base)
            continue
        if base and base in metrics:
            problems.add(f"{name} ({where}): {base} is a {metrics[base]}, not a histogram")
        else:
            problems.add(f"{name} ({where}) is not in {METRICS_FILE}")
    unused = sorted(set(metrics) - families_used)
    print(f"{len(used)} metric names used in alerts/tests/dashboard, {len(metrics)} listed in {METRICS_FILE}")
    if unused:
        print(f"  (listed but unused, fine: {', '.join(unused)})")
    return problems.finish("metric names")


# ---------------------------------------------------------------------------------------------------------------------
# alert rules: conventions, runbook anchors, and that every alert is tested both ways


def github_anchor(heading: str) -> str:
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def check_alerts() -> int:
    problems = Problems()
    rules = load_yaml(ALERTS)
    tests = load_yaml(ALERTS_TEST)
    anchors = {
        github_anchor(match.group(1))
        for match in re.finditer(r"^#+\s+(.+?)\s*$", README.read_text(encoding="utf-8"), re.MULTILINE)
    }
    alerts = []
    for group in rules.get("groups", []):
        for rule in group.get("rules", []):
            if "alert" not in rule:
                continue
            name = rule["alert"]
            alerts.append(name)
            labels = rule.get("labels") or {}
            annotations = rule.get("annotations") or {}
            if labels.get("severity") not in SEVERITIES:
                problems.add(f"{name}: label severity must be one of {sorted(SEVERITIES)}")
            for key in ("summary", "description", "runbook_url"):
                if not annotations.get(key):
                    problems.add(f"{name}: annotation {key} missing")
            url = annotations.get("runbook_url", "")
            if "#" in url:
                anchor = url.rsplit("#", 1)[1]
                if anchor not in anchors:
                    problems.add(f"{name}: runbook_url anchor #{anchor} is not a heading of {README}")
            elif url:
                problems.add(f"{name}: runbook_url should point at a section of {README}")
    if len(alerts) != len(set(alerts)):
        problems.add("duplicate alert names")
    fires: set[str] = set()
    silent: set[str] = set()
    for test in tests.get("tests", []):
        for case in test.get("alert_rule_test", []) or []:
            name = case.get("alertname")
            if name not in alerts:
                problems.add(f"alerts_test.yml tests unknown alert {name!r}")
            (fires if case.get("exp_alerts") else silent).add(name)
    for name in alerts:
        if name not in fires:
            problems.add(f"{name}: no test case in {ALERTS_TEST} shows it firing")
        if name not in silent:
            problems.add(f"{name}: no test case in {ALERTS_TEST} shows it silent (exp_alerts: [])")
    # The jobs the rules select exist in both Prometheus configurations.
    jobs_used = set(re.findall(r'job="([^"]+)"', ALERTS.read_text(encoding="utf-8")))
    for config in (PROM_COMPOSE, PROM_K8S):
        jobs = {job.get("job_name") for job in load_yaml(config).get("scrape_configs", [])}
        for job in sorted(jobs_used - jobs):
            problems.add(f"alerts.yml selects job={job!r}, which {config} does not define")
    print(f"{len(alerts)} alerts; fire-tested {len(fires)}, silence-tested {len(silent)}")
    return problems.finish("alert conventions and test coverage")


# ---------------------------------------------------------------------------------------------------------------------
# Prometheus configuration for Kubernetes: promtool from Debian is built without Kubernetes service discovery


def prom_k8s_substitute(outdir: str) -> int:
    """Writes OUTDIR/prometheus.yml, prometheus-kubernetes.yml with kubernetes_sd_configs checked here and replaced by
    static_configs, so that promtool still checks everything else (relabel rules, regexes, rule files)."""
    problems = Problems()
    config = load_yaml(PROM_K8S)
    roles = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}
    for job in config.get("scrape_configs", []):
        sds = job.pop("kubernetes_sd_configs", None)
        if sds is None:
            continue
        for sd in sds:
            if sd.get("role") not in roles:
                problems.add(f"{job.get('job_name')}: kubernetes_sd_configs role {sd.get('role')!r} not in {sorted(roles)}")
            names = (sd.get("namespaces") or {}).get("names", [])
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                problems.add(f"{job.get('job_name')}: kubernetes_sd_configs namespaces.names must be a list of names")
            unknown = set(sd) - {"role", "namespaces", "selectors", "attach_metadata", "api_server", "kubeconfig_file"}
            if unknown:
                problems.add(f"{job.get('job_name')}: unknown kubernetes_sd_configs keys {sorted(unknown)}")
        job["static_configs"] = [{"targets": ["placeholder.invalid:8080"]}]
    out = Path(outdir)
    (out / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    for rule_file in config.get("rule_files", []):
        (out / rule_file).write_text((PROM_K8S.parent / rule_file).read_text(encoding="utf-8"), encoding="utf-8")
    return problems.finish("kubernetes_sd_configs (checked here, replaced by static_configs for promtool)")


# ---------------------------------------------------------------------------------------------------------------------
# Grafana dashboard and provisioning


GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1d",
}


def iter_panels(panels):
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []) or [])


def check_dashboard(promtool: str) -> int:
    problems = Problems()
    try:
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        print(f"{DASHBOARD} is not valid JSON: {error}", file=sys.stderr)
        return 1
    for key in ("uid", "title", "panels", "schemaVersion", "templating"):
        if key not in dashboard:
            problems.add(f"dashboard has no {key!r}")
    panels = list(iter_panels(dashboard.get("panels", [])))
    ids = [panel.get("id") for panel in panels]
    duplicates = sorted({i for i in ids if ids.count(i) > 1}, key=str)
    if duplicates:
        problems.add(f"duplicate panel ids: {duplicates}")
    if any(not isinstance(i, int) for i in ids):
        problems.add("every panel needs an integer id")
    variables = {var.get("name"): var for var in dashboard.get("templating", {}).get("list", [])}
    ds_var = variables.get("DS_PROMETHEUS")
    if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        problems.add("templating needs DS_PROMETHEUS, a datasource variable of type prometheus")
    provisioned_uids = set()
    for path in sorted((GRAFANA_PROVISIONING / "datasources").glob("*.y*ml")):
        for ds in load_yaml(path).get("datasources", []):
            provisioned_uids.add(ds.get("uid"))
    allowed_uids = {"${DS_PROMETHEUS}"} | provisioned_uids

    boxes = []
    expressions = []
    for panel in panels:
        pid, title = panel.get("id"), panel.get("title")
        if not panel.get("type") or not title:
            problems.add(f"panel {pid}: type and title are required")
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")):
            problems.add(f"panel {pid} ({title}): gridPos needs integer x, y, w, h")
        else:
            if grid["x"] < 0 or grid["w"] <= 0 or grid["x"] + grid["w"] > 24:
                problems.add(f"panel {pid} ({title}): gridPos outside the 24 columns")
            boxes.append((pid, title, grid))
        if panel.get("type") == "row":
            continue
        datasources = [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]
        for ds in datasources:
            uid = ds.get("uid") if isinstance(ds, dict) else ds
            if uid not in allowed_uids:
                problems.add(f"panel {pid} ({title}): datasource {uid!r} is neither ${{DS_PROMETHEUS}} nor a provisioned uid")
        if not panel.get("targets"):
            problems.add(f"panel {pid} ({title}): no query")
        for target in panel.get("targets", []):
            if not target.get("expr"):
                problems.add(f"panel {pid} ({title}) target {target.get('refId')}: empty expr")
                continue
            expressions.append((pid, target.get("refId"), target["expr"]))
    for index, (pid_a, title_a, a) in enumerate(boxes):
        for pid_b, title_b, b in boxes[index + 1 :]:
            if (
                a["x"] < b["x"] + b["w"]
                and b["x"] < a["x"] + a["w"]
                and a["y"] < b["y"] + b["h"]
                and b["y"] < a["y"] + a["h"]
            ):
                problems.add(f"panels {pid_a} ({title_a}) and {pid_b} ({title_b}) overlap")

    # Every query must be valid PromQL: Grafana's variables are substituted and promtool parses them as rules.
    rules = []
    for pid, ref, expr in expressions:
        text = expr
        for var, value in GRAFANA_VARS.items():
            text = text.replace(var, value)
        text = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}|\$[A-Za-z_][A-Za-z0-9_]*", "placeholder", text)
        rules.append({"record": f"dashboard:panel_{pid}_{ref}", "expr": text})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dashboard_queries.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
        result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            problems.add("promtool cannot parse some dashboard queries:\n" + result.stdout + result.stderr)

    # Provisioning: the dashboards provider reads the folder compose mounts the dashboards into.
    compose = load_yaml(COMPOSE)
    mounts = compose.get("services", {}).get("grafana", {}).get("volumes", [])
    targets = {m.split(":")[1] for m in mounts if isinstance(m, str) and m.split(":")[0].endswith("grafana/dashboards")}
    for path in sorted((GRAFANA_PROVISIONING / "dashboards").glob("*.y*ml")):
        config = load_yaml(path)
        if config.get("apiVersion") != 1:
            problems.add(f"{path}: apiVersion must be 1")
        for provider in config.get("providers", []):
            folder = (provider.get("options") or {}).get("path")
            if folder not in targets:
                problems.add(f"{path}: provider path {folder} is not where compose mounts the dashboards ({targets})")
    for path in sorted((GRAFANA_PROVISIONING / "datasources").glob("*.y*ml")):
        if load_yaml(path).get("apiVersion") != 1:
            problems.add(f"{path}: apiVersion must be 1")
    print(f"{len(panels)} panels, {len(expressions)} queries parsed by promtool")
    return problems.finish("Grafana dashboard and provisioning")


# ---------------------------------------------------------------------------------------------------------------------
# Kubernetes manifests: kustomization consistency, cross references, and the deployment rules of issue #5


def k8s_objects() -> list[tuple[Path, dict]]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    objects = []
    for resource in kustomization.get("resources", []):
        path = K8S / resource
        for doc in load_yaml_all(path):
            objects.append((path, doc))
    return objects


def pod_spec(obj: dict):
    kind = obj.get("kind")
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return obj["spec"]["template"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return None


def check_k8s() -> int:
    problems = Problems()
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization.get("resources", []))
    for resource in sorted(listed):
        if not (K8S / resource).is_file():
            problems.add(f"kustomization.yaml lists {resource}, which does not exist")
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    for name in sorted(on_disk - listed):
        problems.add(f"{K8S / name} is not listed in kustomization.yaml resources")
    objects = k8s_objects()
    names = {(obj.get("kind"), obj.get("metadata", {}).get("name")) for _, obj in objects}
    image_names = {image.get("name") for image in kustomization.get("images", [])}

    for path, obj in objects:
        template = pod_spec(obj)
        if template is None:
            continue
        kind, name = obj["kind"], obj["metadata"]["name"]
        spec = template["spec"]
        pod_labels = template.get("metadata", {}).get("labels", {})
        selector = obj["spec"].get("selector", {}).get("matchLabels", {})
        if any(pod_labels.get(k) != v for k, v in selector.items()):
            problems.add(f"{kind}/{name}: selector {selector} does not match the pod labels")
        pod_security = spec.get("securityContext", {})
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claim_templates = {c["metadata"]["name"] for c in obj["spec"].get("volumeClaimTemplates", [])}
        for volume in volumes.values():
            if "configMap" in volume and ("ConfigMap", volume["configMap"]["name"]) not in names:
                problems.add(f"{kind}/{name}: volume {volume['name']} uses ConfigMap {volume['configMap']['name']}, not defined")
            if "secret" in volume and ("Secret", volume["secret"]["secretName"]) not in names:
                problems.add(f"{kind}/{name}: volume {volume['name']} uses Secret {volume['secret']['secretName']}, not defined")
        containers = [("container", c) for c in spec.get("containers", [])]
        containers += [("initContainer", c) for c in spec.get("initContainers", [])]
        declared_ports = set()
        for role, container in containers:
            cname = f"{kind}/{name} {role} {container['name']}"
            if container.get("image") not in image_names:
                problems.add(f"{cname}: image {container.get('image')!r} has no entry in kustomization.yaml images")
            security = container.get("securityContext", {})
            if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
                problems.add(f"{cname}: runAsNonRoot is not set")
            if security.get("readOnlyRootFilesystem") is not True:
                problems.add(f"{cname}: readOnlyRootFilesystem must be true")
            if security.get("allowPrivilegeEscalation") is not False:
                problems.add(f"{cname}: allowPrivilegeEscalation must be false")
            if "ALL" not in (security.get("capabilities", {}) or {}).get("drop", []):
                problems.add(f"{cname}: capabilities must drop ALL")
            resources = container.get("resources", {})
            if not resources.get("requests") or not (resources.get("limits") or {}).get("memory"):
                problems.add(f"{cname}: resources need requests and a memory limit")
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes and mount["name"] not in claim_templates:
                    problems.add(f"{cname}: volumeMount {mount['name']} has no volume")
            for env in container.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ("Secret", ref["name"]) not in names:
                    problems.add(f"{cname}: env {env['name']} uses Secret {ref['name']}, not defined")
                if ref:
                    secret = next(o for _, o in objects if o.get("kind") == "Secret" and o["metadata"]["name"] == ref["name"])
                    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
                    if ref["key"] not in keys:
                        problems.add(f"{cname}: env {env['name']} uses key {ref['key']} absent from Secret {ref['name']}")
            declared_ports |= {p["containerPort"] for p in container.get("ports", [])}
        annotations = template.get("metadata", {}).get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            port = annotations.get("prometheus.io/port", "")
            if not port.isdigit() or int(port) not in declared_ports:
                problems.add(f"{kind}/{name}: prometheus.io/port {port!r} is not a declared container port")

    deployments = [o for _, o in objects if o.get("kind") == "Deployment" and o["metadata"]["name"] == "license-sync-aggregator"]
    if not deployments:
        problems.add("no Deployment license-sync-aggregator")
    for deployment in deployments:
        if deployment["spec"].get("replicas", 1) < 2:
            problems.add("aggregator Deployment: at least 2 replicas")
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if (container.get("readinessProbe") or {}).get("httpGet", {}).get("path") != "/readyz":
                problems.add("aggregator: readinessProbe must GET /readyz")
            if (container.get("livenessProbe") or {}).get("httpGet", {}).get("path") != "/healthz":
                problems.add("aggregator: livenessProbe must GET /healthz")
            env_names = {e["name"] for e in container.get("env", [])}
            if "LICENSE_SYNC_AGGREGATOR_DATABASE_URL" not in env_names:
                problems.add("aggregator: LICENSE_SYNC_AGGREGATOR_DATABASE_URL must come from the Secret")
            if any(e["name"] == "LICENSE_SYNC_AGGREGATOR_CONFIG" for e in container.get("env", [])):
                problems.add("aggregator: pass --config, not LICENSE_SYNC_AGGREGATOR_CONFIG (the config loader refuses it as an unknown key)")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        for kind in ("PodDisruptionBudget", "Service"):
            selecting = [
                o for _, o in objects if o.get("kind") == kind
                and all(pod_labels.get(k) == v for k, v in ((o["spec"].get("selector") or {}).get("matchLabels") or o["spec"].get("selector") or {}).items())
            ]
            if not selecting:
                problems.add(f"no {kind} selects the aggregator pods")
    for kind, name in (("ConfigMap", "license-sync-aggregator"), ("Secret", "license-sync-aggregator-db")):
        if (kind, name) not in names:
            problems.add(f"missing {kind} {name}")

    sidecars = 0
    for _, obj in objects:
        template = pod_spec(obj)
        if template is None:
            continue
        for container in template["spec"].get("initContainers", []):
            if container.get("restartPolicy") == "Always" and container.get("image") == "license-sync-agent":
                sidecars += 1
                if (container.get("args") or [None])[0] != "run":
                    problems.add(f"{obj['kind']}/{obj['metadata']['name']}: the agent sidecar must run `run`")
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                claims = {c["metadata"]["name"] for c in obj["spec"].get("volumeClaimTemplates", [])}
                state = mounts.get("/var/lib/license-sync-agent")
                pvc_volumes = {v["name"] for v in template["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
                if state not in claims | pvc_volumes:
                    problems.add(f"{obj['kind']}/{obj['metadata']['name']}: the agent state dir must be on a PVC")
    if not sidecars:
        problems.add("no license-sync-agent native sidecar (initContainers entry with restartPolicy: Always)")
    print(f"{len(objects)} objects from {len(listed)} files, {sidecars} agent sidecar(s)")
    return problems.finish("Kubernetes cross references and deployment rules")


# ---------------------------------------------------------------------------------------------------------------------
# compose: what the compose-spec schema cannot see


def check_compose() -> int:
    problems = Problems()
    compose = load_yaml(COMPOSE)
    base = COMPOSE.parent
    services = compose.get("services", {})
    volumes = set((compose.get("volumes") or {}).keys())
    aliases = set(services)
    for service in services.values():
        for network in (service.get("networks") or {}).values() if isinstance(service.get("networks"), dict) else []:
            aliases |= set((network or {}).get("aliases", []))
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        for target in depends if isinstance(depends, (list, dict)) else []:
            if target not in services:
                problems.add(f"{name}: depends_on unknown service {target}")
            elif isinstance(depends, dict):
                condition = (depends[target] or {}).get("condition")
                target_service = services[target]
                if condition == "service_healthy":
                    healthcheck = target_service.get("healthcheck") or {}
                    build = target_service.get("build") if isinstance(target_service.get("build"), dict) else {}
                    dockerfile = base / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
                    image_check = bool(build) and dockerfile.is_file() and re.search(
                        r"^HEALTHCHECK\s+(?!NONE)", dockerfile.read_text(encoding="utf-8"), re.MULTILINE)
                    if healthcheck.get("disable"):
                        problems.add(f"{name}: waits for {target} to be healthy, but its health check is disabled")
                    elif not healthcheck.get("test") and not image_check:
                        problems.add(f"{name}: waits for {target} to be healthy, but {target} has no health check")
                if condition == "service_completed_successfully" and target_service.get("restart") not in ("no", None):
                    problems.add(f"{name}: waits for {target} to complete, but {target} restarts")
        for mount in service.get("volumes", []) or []:
            if not isinstance(mount, str):
                continue
            source = mount.split(":", 1)[0]
            if source.startswith((".", "/")):
                if not (base / source).exists():
                    problems.add(f"{name}: bind mount source {source} does not exist (relative to {base})")
            elif source not in volumes:
                problems.add(f"{name}: named volume {source} is not declared under volumes:")
        build = service.get("build")
        if isinstance(build, dict):
            context = base / build.get("context", ".")
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                problems.add(f"{name}: Dockerfile {dockerfile} does not exist")
            elif not Path(f"{dockerfile}.dockerignore").is_file():
                problems.add(f"{name}: {dockerfile}.dockerignore missing (the context is the whole repository)")
    # Prometheus scrapes compose services; Grafana's datasource points at the prometheus service.
    for job in load_yaml(PROM_COMPOSE).get("scrape_configs", []):
        for static in job.get("static_configs", []):
            for target in static.get("targets", []):
                host = target.rsplit(":", 1)[0]
                if host not in aliases and host != "localhost":
                    problems.add(f"prometheus.yml job {job['job_name']}: target {target} is not a compose service")
    for path in sorted((GRAFANA_PROVISIONING / "datasources").glob("*.y*ml")):
        for ds in load_yaml(path).get("datasources", []):
            host = re.sub(r"^\w+://", "", ds.get("url", "")).split(":")[0].split("/")[0]
            if host not in services:
                problems.add(f"{path}: datasource url host {host!r} is not a compose service")
    print(f"{len(services)} services, {len(volumes)} named volumes")
    return problems.finish("compose cross references")


# ---------------------------------------------------------------------------------------------------------------------
# TOML: the compose agents' files and the TOML embedded in Kubernetes ConfigMaps parse


def check_toml() -> int:
    problems = Problems()
    count = 0
    for path in sorted(DEPLOY.rglob("*.toml")):
        count += 1
        try:
            tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            problems.add(f"{path}: {error}")
    for path, obj in k8s_objects():
        if obj.get("kind") != "ConfigMap":
            continue
        for key, value in (obj.get("data") or {}).items():
            if key.endswith(".toml"):
                count += 1
                try:
                    tomllib.loads(value)
                except tomllib.TOMLDecodeError as error:
                    problems.add(f"{path} ConfigMap {obj['metadata']['name']} key {key}: {error}")
    print(f"{count} TOML documents")
    return problems.finish("TOML syntax")


CHECKS = {
    "metrics": check_metrics,
    "alerts": check_alerts,
    "prom-k8s-substitute": prom_k8s_substitute,
    "dashboard": check_dashboard,
    "k8s": check_k8s,
    "compose": check_compose,
    "toml": check_toml,
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in CHECKS:
        print(f"usage: {sys.argv[0]} {{{'|'.join(CHECKS)}}} [ARGS]", file=sys.stderr)
        return 2
    os.chdir(Path(__file__).resolve().parent.parent)
    try:
        return CHECKS[sys.argv[1]](*sys.argv[2:])
    except (OSError, ValueError, yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        # Unreadable or unparsable input (json.JSONDecodeError is a ValueError): one clear line, no traceback.
        print(f"{sys.argv[1]}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except (KeyError, TypeError, AttributeError, IndexError) as error:
        print(f"{sys.argv[1]}: unexpected structure ({type(error).__name__}: {error}); "
              "a required key is missing or has the wrong type", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
