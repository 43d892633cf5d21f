#!/usr/bin/env bash
# Starts the local single-node Kubernetes cluster (shared/k8s-local, beside this repository) and
# applies kmount's cluster test fixtures. Fails loudly when the cluster cannot start.
#
# Prints the admin kubeconfig path on its last line. Writes into $KMOUNT_CLUSTER_DIR (default
# /tmp/kmount-cluster):
#   restricted.kubeconfig   the ServiceAccount kmount-noexec: may get/list pods, no pods/exec
#   contexts.kubeconfig     two contexts on the admin user: kmount-a (namespace default, the
#                           current one) and kmount-b (namespace kmount-ns)
#   env                     KUBECONFIG=... and KMOUNT_CLUSTER_DIR=..., to source
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${KMOUNT_CLUSTER_DIR:-/tmp/kmount-cluster}
die() { echo "cluster-up: $*" >&2; exit 1; }

up=
for candidate in "$here/../../shared/k8s-local/up.sh" /work/shared/k8s-local/up.sh; do
  if [ -x "$candidate" ]; then up=$candidate; break; fi
done
[ -n "$up" ] || die "cannot find k8s-local/up.sh (looked in $here/../../shared/k8s-local and /work/shared/k8s-local)"

echo "cluster-up: starting the cluster with $up (first run builds Kubernetes: 6 to 30 min)" >&2
pressure_hint() {  # why pods may not run: the kubelet evicts them when the disk is nearly full
  local k=/opt/k8s-local/etc/admin.kubeconfig
  if [ -f "$k" ] && KUBECONFIG=$k kubectl describe nodes 2>/dev/null | grep -q 'DiskPressure *True'; then
    echo "; the node reports DiskPressure: free disk space (df -h /; the kubelet evicts pods \
below about 10-15% free, and lifts the pressure 5 min after)"
  fi
}
up_out=$("$up") || { code=$?; die "$up failed (exit $code); logs in /opt/k8s-local/logs/$(pressure_hint)"; }
kubeconfig=$(printf '%s\n' "$up_out" | tail -n 1)
[ -f "$kubeconfig" ] || die "$up did not print a kubeconfig path (last line: '$kubeconfig')"
export KUBECONFIG=$kubeconfig
command -v kubectl >/dev/null || die "kubectl is not installed (up.sh installs kubernetes-client)"

wait_for() {  # wait_for SECONDS WHAT COMMAND…
  local secs=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || die "$what did not happen within ${secs}s (last try: $("$@" 2>&1 | tail -n 3))"
    sleep 1
  done
}
wait_for 180 "the API server answering" kubectl get --raw /readyz
wait_for 180 "the node becoming Ready" kubectl wait --for=condition=Ready node --all --timeout=5s
kubectl get namespace kmount-ns >/dev/null 2>&1 || kubectl create namespace kmount-ns >/dev/null
wait_for 120 "the default ServiceAccount in default" kubectl get serviceaccount default -n default
wait_for 120 "the default ServiceAccount in kmount-ns" kubectl get serviceaccount default -n kmount-ns
kubectl get deploy app -n default >/dev/null 2>&1 ||
  kubectl apply -f /opt/k8s-local/etc/app-deployment.yaml >/dev/null ||
  die "the Deployment app (from k8s-local's README) is missing and cannot be created"

# Fixture pods the kubelet evicted (disk or memory pressure) stay as Failed records and would
# never run again: they go, and are made again below.
kubectl delete pods --all-namespaces --field-selector=status.phase=Failed --wait=false >/dev/null 2>&1 || true

# Long-running commands: `sleep infinity` where coreutils has it, a long busybox sleep otherwise.
kubectl apply -f - >/dev/null <<'EOF' || die "cannot apply the test fixtures"
apiVersion: v1
kind: Pod
metadata: {name: kmount-busybox, namespace: default, labels: {kmount-fixture: "true"}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: localhost/busybox:local
    imagePullPolicy: Never
    command: ["sh", "-c", "mkdir -p /work && exec sleep 100000000"]
---
apiVersion: v1
kind: Pod
metadata: {name: kmount-nonroot, namespace: default, labels: {kmount-fixture: "true"}}
spec:
  terminationGracePeriodSeconds: 1
  securityContext: {runAsUser: 1000, runAsGroup: 1000, fsGroup: 1000}
  containers:
  - name: main
    image: localhost/debian:bookworm
    imagePullPolicy: Never
    workingDir: /work
    command: ["sleep", "infinity"]
    volumeMounts: [{name: work, mountPath: /work}]
  volumes: [{name: work, emptyDir: {}}]
---
apiVersion: v1
kind: Pod
metadata: {name: kmount-pause, namespace: default, labels: {kmount-fixture: "true"}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: pause
    image: k8s.gcr.io/pause:3.2
    imagePullPolicy: Never
---
apiVersion: v1
kind: Pod
metadata: {name: kmount-readonly, namespace: default, labels: {kmount-fixture: "true"}}
spec:
  terminationGracePeriodSeconds: 1
  automountServiceAccountToken: false
  containers:
  - name: main
    image: localhost/debian:bookworm
    imagePullPolicy: Never
    command: ["sleep", "infinity"]
    securityContext: {readOnlyRootFilesystem: true}
---
apiVersion: v1
kind: Pod
metadata:
  name: kmount-multi
  namespace: default
  labels: {kmount-fixture: "true"}
  annotations: {kubectl.kubernetes.io/default-container: second}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: first
    image: localhost/debian:bookworm
    imagePullPolicy: Never
    command: ["sh", "-c", "mkdir -p /data && echo first > /data/who && exec sleep infinity"]
  - name: second
    image: localhost/busybox:local
    imagePullPolicy: Never
    command: ["sh", "-c", "mkdir -p /data && echo second > /data/who && exec sleep 100000000"]
---
apiVersion: v1
kind: Pod
metadata: {name: kmount-node, namespace: default, labels: {kmount-fixture: "true"}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: node
    image: localhost/node:bookworm
    imagePullPolicy: Never
    workingDir: /srv/app
    command: ["sleep", "infinity"]
    volumeMounts: [{name: app, mountPath: /srv/app}]
  volumes: [{name: app, emptyDir: {}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: kmount-restart, namespace: default, labels: {kmount-fixture: "true"}}
spec:
  replicas: 1
  selector: {matchLabels: {app: kmount-restart}}
  template:
    metadata: {labels: {app: kmount-restart}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: localhost/debian:bookworm
        imagePullPolicy: Never
        command: ["sh", "-c", "mkdir -p /work && exec sleep infinity"]
---
apiVersion: v1
kind: Pod
metadata: {name: kmount-ns-pod, namespace: kmount-ns, labels: {kmount-fixture: "true"}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: localhost/debian:bookworm
    imagePullPolicy: Never
    command: ["sh", "-c", "mkdir -p /data && echo kmount-ns > /data/where && exec sleep infinity"]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: kmount-noexec, namespace: default}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: kmount-noexec, namespace: default}
rules:
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["apps"]
  resources: ["deployments", "replicasets", "statefulsets", "daemonsets"]
  verbs: ["get", "list"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: kmount-noexec, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: kmount-noexec}
subjects:
- {kind: ServiceAccount, name: kmount-noexec, namespace: default}
EOF

kubectl wait --for=condition=Ready pod -l kmount-fixture=true -n default --timeout=300s >/dev/null ||
  die "the fixture pods did not become ready: $(kubectl get pods -n default -o wide 2>&1)$(pressure_hint)"
kubectl wait --for=condition=Ready pod -l kmount-fixture=true -n kmount-ns --timeout=300s >/dev/null ||
  die "the fixture pod in kmount-ns did not become ready: $(kubectl get pods -n kmount-ns 2>&1)"
kubectl rollout status deploy/app -n default --timeout=300s >/dev/null ||
  die "the Deployment app did not become ready: $(kubectl get pods -n default 2>&1)"

mkdir -p "$out"
chmod 700 "$out"
server=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
ca_file=$(mktemp)
trap 'rm -f "$ca_file"' EXIT
kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' | base64 -d > "$ca_file" ||
  kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority}' | xargs cat > "$ca_file"
[ -s "$ca_file" ] || die "cannot read the cluster's CA from $KUBECONFIG"

# The restricted ServiceAccount's token (Kubernetes 1.20 creates token Secrets for
# ServiceAccounts; newer clusters need `kubectl create token`).
token=
deadline=$(( $(date +%s) + 60 ))
while [ -z "$token" ]; do
  secret=$(kubectl get serviceaccount kmount-noexec -n default -o jsonpath='{.secrets[0].name}' 2>/dev/null || true)
  if [ -n "$secret" ]; then
    token=$(kubectl get secret "$secret" -n default -o jsonpath='{.data.token}' | base64 -d)
  else
    token=$(kubectl create token kmount-noexec -n default 2>/dev/null || true)
  fi
  [ -n "$token" ] || { [ "$(date +%s)" -lt "$deadline" ] || die "no token for the ServiceAccount kmount-noexec"; sleep 1; }
done
rk=$out/restricted.kubeconfig
rm -f "$rk"
KUBECONFIG=$rk kubectl config set-cluster local --server="$server" --certificate-authority="$ca_file" --embed-certs=true >/dev/null
KUBECONFIG=$rk kubectl config set-credentials kmount-noexec --token="$token" >/dev/null
KUBECONFIG=$rk kubectl config set-context kmount-noexec --cluster=local --user=kmount-noexec --namespace=default >/dev/null
KUBECONFIG=$rk kubectl config use-context kmount-noexec >/dev/null
chmod 600 "$rk"

# Two contexts on the admin credentials, for context selection.
ck=$out/contexts.kubeconfig
kubectl config view --raw --flatten > "$ck.tmp"
user=$(KUBECONFIG=$ck.tmp kubectl config view -o jsonpath='{.contexts[0].context.user}')
cluster=$(KUBECONFIG=$ck.tmp kubectl config view -o jsonpath='{.contexts[0].context.cluster}')
KUBECONFIG=$ck.tmp kubectl config set-context kmount-a --cluster="$cluster" --user="$user" --namespace=default >/dev/null
KUBECONFIG=$ck.tmp kubectl config set-context kmount-b --cluster="$cluster" --user="$user" --namespace=kmount-ns >/dev/null
KUBECONFIG=$ck.tmp kubectl config use-context kmount-a >/dev/null
mv "$ck.tmp" "$ck"
chmod 600 "$ck"

printf 'KUBECONFIG=%s\nKMOUNT_CLUSTER_DIR=%s\n' "$kubeconfig" "$out" > "$out/env"
echo "cluster-up: the cluster is up; fixtures applied; helper kubeconfigs in $out" >&2
echo "$kubeconfig"
