{{/* Names, labels and the few values every template derives the same way. */}}

{{- define "csi-flashcopy.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name: "csi-flashcopy" for a release called csi-flashcopy (or csi-flashcopy-*). */}}
{{- define "csi-flashcopy.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "csi-flashcopy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable across upgrades (Deployment/DaemonSet selectors are immutable). */}}
{{- define "csi-flashcopy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "csi-flashcopy.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Common labels; call with (dict "root" $ "component" "node"). helm.sh/chart and managed-by exist only in Helm
     renders (deploy/kubernetes is generated without them). */}}
{{- define "csi-flashcopy.labels" -}}
{{ include "csi-flashcopy.selectorLabels" . }}
app.kubernetes.io/part-of: csi-flashcopy
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
helm.sh/chart: {{ include "csi-flashcopy.chart" .root }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{- define "csi-flashcopy.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "csi-flashcopy.sidecarImage" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{- define "csi-flashcopy.nodeServiceAccount" -}}
{{- printf "%s-node" (include "csi-flashcopy.fullname" .) -}}
{{- end -}}

{{- define "csi-flashcopy.controllerServiceAccount" -}}
{{- printf "%s-controller" (include "csi-flashcopy.fullname" .) -}}
{{- end -}}

{{/* The ServiceAccount whose pods run the controller sidecars in the chosen topology. */}}
{{- define "csi-flashcopy.sidecarServiceAccount" -}}
{{- if eq .Values.topology "single-node" -}}
{{- include "csi-flashcopy.nodeServiceAccount" . -}}
{{- else -}}
{{- include "csi-flashcopy.controllerServiceAccount" . -}}
{{- end -}}
{{- end -}}

{{/* Host directory of the plugin socket, as the kubelet sees it. */}}
{{- define "csi-flashcopy.pluginDir" -}}
{{- printf "%s/plugins/%s" (.Values.kubeletDir | trimSuffix "/") .Values.driverName -}}
{{- end -}}

{{- define "csi-flashcopy.engineEndpoint" -}}
{{- printf "unix://%s/engine.sock" (.Values.stateDir | trimSuffix "/") -}}
{{- end -}}

{{/* multi-node: the Secret with one identity's mutual TLS files (ca.crt, tls.crt, tls.key) for the engine API:
     (dict "root" $ "role" "controller"|"node"). The controller's is mounted in the controller pods only, the node's
     in the node pods only (docs/install.md, "Security"). */}}
{{- define "csi-flashcopy.tlsSecretName" -}}
{{- index .root.Values.tls.existingSecrets .role | default (printf "%s-%s-tls" (include "csi-flashcopy.fullname" .root) .role) -}}
{{- end -}}

{{/* Where the TLS Secret is mounted (engine containers and the controller's driver container). */}}
{{- define "csi-flashcopy.tlsDir" -}}
/etc/flashcopy/tls
{{- end -}}

{{- define "csi-flashcopy.tlsMount" -}}
- name: engine-tls
  mountPath: {{ include "csi-flashcopy.tlsDir" . }}
  readOnly: true
{{- end -}}

{{/* (dict "root" $ "role" "controller"|"node") */}}
{{- define "csi-flashcopy.tlsVolume" -}}
- name: engine-tls
  secret:
    secretName: {{ include "csi-flashcopy.tlsSecretName" . }}
    # Readable by the controller's non-root user through the pod's fsGroup; root in the node pod.
    defaultMode: 0440
{{- end -}}

{{/* Downward API env var: (dict "name" "POD_IP" "field" "status.podIP"). */}}
{{- define "csi-flashcopy.fieldEnv" -}}
- name: {{ .name }}
  valueFrom:
    fieldRef:
      fieldPath: {{ .field }}
{{- end -}}

{{/* multi-node: what makes a node engine serve the controllers: the engine API on the pod IP over mutual TLS, and
     the node's Lease in the release namespace. With engine.separateContainer the engine container takes these as
     `engine` flags (listenFlag --listen), otherwise `serve` passes them to the engine it starts (--engine-listen;
     serve already has --node-id). */}}
{{- define "csi-flashcopy.engineClusterArgs" -}}
- {{ .listenFlag }}=$(POD_IP):{{ .root.Values.engine.port }}
- --tls-dir={{ include "csi-flashcopy.tlsDir" .root }}
{{- if eq .listenFlag "--listen" }}
- --node-id=$(NODE_NAME)
{{- end }}
- --namespace=$(POD_NAMESPACE)
{{- end -}}

{{/* Args shared by every csi-flashcopy container. */}}
{{- define "csi-flashcopy.logArgs" -}}
- --log-format={{ .Values.logFormat }}
- --log-level={{ .Values.logLevel }}
{{- end -}}

{{/* The controller sidecars (provisioner, snapshotter, resizer) as container specs; used by the node DaemonSet in the
     single-node topology and by the controller Deployment in the multi-node topology. Socket at /csi/csi.sock. */}}
{{- define "csi-flashcopy.controllerSidecars" -}}
{{- $sc := .Values.sidecars -}}
{{- $le := .Values.leaderElection.enabled -}}
{{- $multi := eq .Values.topology "multi-node" -}}
{{- range $name := list "provisioner" "snapshotter" "resizer" }}
{{- $s := index $sc $name }}
- name: csi-{{ $name }}
  image: {{ include "csi-flashcopy.sidecarImage" $s.image }}
  imagePullPolicy: {{ $s.image.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --v={{ $sc.logLevel }}
    - --timeout={{ $s.timeout }}
    - --leader-election={{ $le }}
    - --http-endpoint=:{{ $s.httpPort }}
    {{- if eq $name "provisioner" }}
    - --feature-gates=Topology=true
    - --extra-create-metadata
    # Volumes are node-local: ask for the selected node only, not every node with the same topology keys.
    - --strict-topology
    {{- if $multi }}
    # Publish each node's free space (CSIStorageCapacity objects owned by the Deployment, found through
    # pod -> ReplicaSet -> Deployment) so that the scheduler only picks nodes whose engine has room.
    - --enable-capacity
    - --capacity-ownerref-level=2
    {{- end }}
    {{- else if eq $name "snapshotter" }}
    - --feature-gates=CSIVolumeGroupSnapshot=true
    - --extra-create-metadata
    {{- end }}
    {{- range $s.extraArgs }}
    - {{ . }}
    {{- end }}
  {{- if and $multi (eq $name "provisioner") }}
  env:
    # --enable-capacity: the pod the CSIStorageCapacity objects' owner chain starts from.
    {{- include "csi-flashcopy.fieldEnv" (dict "name" "POD_NAME" "field" "metadata.name") | nindent 4 }}
    {{- include "csi-flashcopy.fieldEnv" (dict "name" "NAMESPACE" "field" "metadata.namespace") | nindent 4 }}
  {{- end }}
  ports:
    - name: {{ $name | trunc 4 }}-http
      containerPort: {{ $s.httpPort }}
      protocol: TCP
  {{- if $le }}
  livenessProbe:
    httpGet:
      path: /healthz/leader-election
      port: {{ $name | trunc 4 }}-http
    initialDelaySeconds: 10
    periodSeconds: 20
    timeoutSeconds: 10
    failureThreshold: 1
  {{- end }}
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
  {{- with $s.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* livenessprobe sidecar: serves /healthz on healthPort by calling the plugin's Probe. */}}
{{- define "csi-flashcopy.livenessProbeSidecar" -}}
{{- $s := .root.Values.sidecars.livenessProbe -}}
- name: liveness-probe
  image: {{ include "csi-flashcopy.sidecarImage" $s.image }}
  imagePullPolicy: {{ $s.image.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --http-endpoint=:{{ .port }}
    - --v={{ .root.Values.sidecars.logLevel }}
    {{- range $s.extraArgs }}
    - {{ . }}
    {{- end }}
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
  {{- with $s.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* snapshotMetadata: the Service (and the base of the other object names) of the external-snapshot-metadata
     sidecar, and the Secret with its server certificate. */}}
{{- define "csi-flashcopy.snapshotMetadataName" -}}
{{- printf "%s-snapshot-metadata" (include "csi-flashcopy.fullname" .) -}}
{{- end -}}

{{- define "csi-flashcopy.snapshotMetadataSecretName" -}}
{{- .Values.snapshotMetadata.tls.existingSecret | default (printf "%s-tls" (include "csi-flashcopy.snapshotMetadataName" .)) -}}
{{- end -}}

{{/* The component whose pods run the sidecar (and the controller sidecars): the Service selects them. */}}
{{- define "csi-flashcopy.snapshotMetadataComponent" -}}
{{- ternary "node" "controller" (eq .Values.topology "single-node") -}}
{{- end -}}

{{/* The DNS names of the Service, in the certificate; the first is the host of the SnapshotMetadataService's
     address. */}}
{{- define "csi-flashcopy.snapshotMetadataDNSNames" -}}
{{- $svc := include "csi-flashcopy.snapshotMetadataName" . -}}
{{- $ns := .Release.Namespace -}}
{{- list (printf "%s.%s" $svc $ns) $svc (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.snapshotMetadata.clusterDomain) | toJson -}}
{{- end -}}

{{- define "csi-flashcopy.snapshotMetadataTLSDir" -}}
/etc/snapshot-metadata/tls
{{- end -}}

{{/* The external-snapshot-metadata sidecar (KEP-3314 changed-block tracking) on the controller socket
     /csi/csi.sock: serves the Kubernetes SnapshotMetadata API over TLS on snapshotMetadata.port. Not
     leader-elected: every replica answers, its driver routes to the node that holds the snapshots. */}}
{{- define "csi-flashcopy.snapshotMetadataSidecar" -}}
{{- $s := .Values.snapshotMetadata -}}
{{- $dir := include "csi-flashcopy.snapshotMetadataTLSDir" . -}}
- name: csi-snapshot-metadata
  image: {{ include "csi-flashcopy.sidecarImage" $s.image }}
  imagePullPolicy: {{ $s.image.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --tls-cert={{ $dir }}/tls.crt
    - --tls-key={{ $dir }}/tls.key
    - --port={{ $s.port }}
    - --http-endpoint=:{{ $s.httpPort }}
    - --timeout={{ $s.timeout }}
    - --v={{ .Values.sidecars.logLevel }}
    {{- range $s.extraArgs }}
    - {{ . }}
    {{- end }}
  ports:
    - name: smd-grpc
      containerPort: {{ $s.port }}
      protocol: TCP
    - name: smd-http
      containerPort: {{ $s.httpPort }}
      protocol: TCP
  readinessProbe:
    # ok once the sidecar has validated the driver (GetPluginInfo, Probe, SNAPSHOT_METADATA_SERVICE): the Service
    # sends backup clients only to such pods.
    httpGet:
      path: /health
      port: smd-http
    periodSeconds: 10
    timeoutSeconds: 3
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
    - name: snapshot-metadata-tls
      mountPath: {{ $dir }}
      readOnly: true
  {{- with $s.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{- define "csi-flashcopy.snapshotMetadataVolume" -}}
- name: snapshot-metadata-tls
  secret:
    secretName: {{ include "csi-flashcopy.snapshotMetadataSecretName" . }}
    # Readable by the controller's non-root user through the pod's fsGroup; root in the node pod.
    defaultMode: 0440
{{- end -}}
