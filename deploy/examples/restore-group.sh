#!/usr/bin/env bash
# Print one PVC per member of a VolumeGroupSnapshot, restored from that member's snapshot:
#   deploy/examples/restore-group.sh db-snapshot [-restored] | kubectl apply -f -
# creates db-data-restored and db-log-restored from the group snapshot of deploy/examples/group-snapshot.yaml.
# Uses the current kubectl context and namespace (set KUBECTL or pass -n via NAMESPACE=...).
set -euo pipefail
group=${1:?usage: $0 VOLUME_GROUP_SNAPSHOT [NAME_SUFFIX]}
suffix=${2:--restored}
kubectl=${KUBECTL:-kubectl}
ns_args=()
[ -n "${NAMESPACE:-}" ] && ns_args=(-n "$NAMESPACE")

ready=$("$kubectl" "${ns_args[@]}" get volumegroupsnapshot "$group" -o jsonpath='{.status.readyToUse}')
[ "$ready" = "true" ] || { echo "volumegroupsnapshot $group is not ready (readyToUse=$ready)" >&2; exit 1; }
# One line per member: <snapshot name> <source PVC name>
members=$("$kubectl" "${ns_args[@]}" get volumesnapshot -o jsonpath="{range .items[?(@.status.volumeGroupSnapshotName==\"$group\")]}{.metadata.name} {.spec.source.persistentVolumeClaimName}{\"\\n\"}{end}")
[ -n "$members" ] || { echo "volumegroupsnapshot $group has no member snapshots" >&2; exit 1; }
while read -r snap pvc; do
  [ -n "$snap" ] || continue
  # Same class and size as the source volume.
  read -r class size <<< "$("$kubectl" "${ns_args[@]}" get pvc "$pvc" \
    -o jsonpath='{.spec.storageClassName} {.spec.resources.requests.storage}')"
  cat <<YAML
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: ${pvc}${suffix}
  labels:
    restored-from: ${group}
spec:
  storageClassName: ${class}
  dataSource:
    apiGroup: snapshot.storage.k8s.io
    kind: VolumeSnapshot
    name: ${snap}
  accessModes: ["ReadWriteOnce"]
  resources:
    requests:
      storage: ${size}
YAML
done <<< "$members"
