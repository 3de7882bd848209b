#!/usr/bin/env bash
# End to end on a local kind cluster, for users with Docker:
#   1. create a kind cluster (the FL data directory mounted into its node),
#   2. install Istio (istioctl) and Prometheus (the Prometheus Operator, by helm),
#   3. build the meshctl image and load it into the cluster,
#   4. apply the dev overlay with `meshctl apply -k manifests/overlays/dev`,
#   5. wait until the controller has armed ROUNDS rounds, and print `meshctl status`.
#
#   make e2e-kind                          # or: deploy/e2e-kind.sh
#   KEEP=1 ROUNDS=5 deploy/e2e-kind.sh     # keep the cluster afterwards
#
# Settings (environment): CLUSTER (meshctl-e2e), ROUNDS (3), DATA_DIR (the
# prepared data directory: clients/<pod name>.npz and the server's sets;
# default $MESHCTL_DATA_DIR), MESHCTL (.venv/bin/meshctl), TIMEOUT_S (900),
# KEEP (0: delete the cluster at the end).
set -euo pipefail

CLUSTER="${CLUSTER:-meshctl-e2e}"
ROUNDS="${ROUNDS:-3}"
DATA_DIR="${DATA_DIR:-${MESHCTL_DATA_DIR:-}}"
MESHCTL="${MESHCTL:-.venv/bin/meshctl}"
TIMEOUT_S="${TIMEOUT_S:-900}"
KEEP="${KEEP:-0}"
NAMESPACE=fl
IMAGE=meshctl:dev
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'e2e-kind: %s\n' "$*" >&2; exit 1; }

check_prerequisites() {
  local missing=()
  local tool
  declare -A where=(
    [docker]="https://docs.docker.com/get-docker/"
    [kind]="https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
    [kubectl]="https://kubernetes.io/docs/tasks/tools/"
    [istioctl]="https://istio.io/latest/docs/setup/getting-started/#download"
    [helm]="https://helm.sh/docs/intro/install/"
  )
  for tool in docker kind kubectl istioctl helm; do
    command -v "$tool" > /dev/null 2>&1 || missing+=("  $tool: install it, see ${where[$tool]}")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    printf 'e2e-kind needs these tools on PATH:\n%s\n' "$(printf '%s\n' "${missing[@]}")" >&2
    exit 1
  fi
  docker info > /dev/null 2>&1 \
    || die "the Docker engine does not answer ('docker info' failed); start Docker first"
  [ -x "$ROOT/$MESHCTL" ] || [ -x "$MESHCTL" ] \
    || die "no meshctl at $MESHCTL; run 'make setup' or set MESHCTL"
  [ -n "$DATA_DIR" ] && [ -d "$DATA_DIR" ] \
    || die "no data directory (DATA_DIR or MESHCTL_DATA_DIR); prepare one with 'meshctl data fetch'"
}

meshctl() {
  if [ -x "$ROOT/$MESHCTL" ]; then "$ROOT/$MESHCTL" "$@"; else "$MESHCTL" "$@"; fi
}

create_cluster() {
  say "kind cluster $CLUSTER"
  if kind get clusters | grep -qx "$CLUSTER"; then
    echo "reusing the existing cluster $CLUSTER" >&2
  else
    kind create cluster --name "$CLUSTER" --wait 120s --config - <<KIND
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    extraMounts:
      - hostPath: $(cd "$DATA_DIR" && pwd)
        containerPath: /data/fl
        readOnly: true
KIND
  fi
  kubectl config use-context "kind-$CLUSTER" > /dev/null
}

install_istio() {
  say "Istio"
  istioctl install -y --set profile=minimal
}

install_prometheus() {
  say "Prometheus (kube-prometheus-stack; PodMonitors of every namespace)"
  helm repo add prometheus-community https://prometheus-community.github.io/helm-charts > /dev/null
  helm repo update prometheus-community > /dev/null
  helm upgrade --install prometheus prometheus-community/kube-prometheus-stack \
    --namespace monitoring --create-namespace --wait --timeout 10m \
    --set grafana.enabled=false --set alertmanager.enabled=false \
    --set prometheus.prometheusSpec.podMonitorSelectorNilUsesHelmValues=false \
    --set prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false
}

load_image() {
  say "image $IMAGE"
  docker build -t "$IMAGE" "$ROOT"
  kind load docker-image "$IMAGE" --name "$CLUSTER"
}

data_volume() {
  # The claim fl-data binds to the node's copy of the data directory.
  kubectl apply -f - <<PV
apiVersion: v1
kind: PersistentVolume
metadata:
  name: fl-data-$CLUSTER
spec:
  capacity: {storage: 2Gi}
  accessModes: [ReadOnlyMany]
  storageClassName: standard
  persistentVolumeReclaimPolicy: Retain
  claimRef: {namespace: $NAMESPACE, name: fl-data}
  hostPath: {path: /data/fl, type: Directory}
PV
}

deploy() {
  say "the dev overlay"
  meshctl apply -k "$ROOT/manifests/overlays/dev"
  # The round API's shared token; the controller and server pods wait for it.
  kubectl -n "$NAMESPACE" create secret generic meshctl-round-api-token \
    --from-literal=token="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
    --dry-run=client -o yaml | kubectl apply -f -
  kubectl -n "$NAMESPACE" rollout status statefulset/fl-clients --timeout=10m
  kubectl -n "$NAMESPACE" rollout status deployment/meshctl-controller --timeout=5m
  kubectl -n "$NAMESPACE" rollout status deployment/fl-server --timeout=5m
}

round_of() {
  # The round a routing version names: r3-0a1b2c3d -> 3; anything else -> 0.
  local n="${1#r}"
  n="${n%%-*}"
  case "$n" in '' | *[!0-9]*) echo 0 ;; *) echo "$n" ;; esac
}

wait_for_rounds() {
  say "waiting for $ROUNDS rounds"
  local deadline=$((SECONDS + TIMEOUT_S)) version=""
  while [ "$SECONDS" -lt "$deadline" ]; do
    version="$(meshctl status -n "$NAMESPACE" -o json \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["routing_version"] or "")')"
    [ "$(round_of "$version")" -ge "$ROUNDS" ] && break
    sleep 10
  done
  meshctl status -n "$NAMESPACE"
  [ "$(round_of "$version")" -ge "$ROUNDS" ] \
    || die "fewer than $ROUNDS rounds within $TIMEOUT_S s (routing version '$version'); see kubectl -n $NAMESPACE logs deploy/meshctl-controller"
  say "$ROUNDS rounds armed (routing version $version)"
}

cleanup() {
  if [ "$KEEP" = "1" ]; then
    echo "keeping the cluster: kind delete cluster --name $CLUSTER" >&2
  else
    kind delete cluster --name "$CLUSTER" || true
  fi
}

main() {
  check_prerequisites
  create_cluster
  trap cleanup EXIT
  install_istio
  install_prometheus
  load_image
  data_volume
  deploy
  wait_for_rounds
}

main "$@"
