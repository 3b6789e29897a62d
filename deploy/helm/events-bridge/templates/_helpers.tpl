{{/*
Named templates. The pod spec is built once here and used by the Deployment and the StatefulSet;
sidecar mode only changes where the bridge container goes in it.
*/}}

{{- define "events-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "events-bridge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "events-bridge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "events-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "events-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "events-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "events-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "events-bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "events-bridge.secretName" -}}
{{- default (include "events-bridge.fullname" .) .Values.secret.existingSecret }}
{{- end }}

{{- define "events-bridge.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The config file's text: the operator's, or the shipped one. */}}
{{- define "events-bridge.configText" -}}
{{- $own := .Values.config.bridgeYaml }}
{{- if kindIs "map" $own }}
{{- toYaml $own }}
{{- else if $own }}
{{- $own }}
{{- else }}
{{- .Files.Get "files/bridge.yaml" }}
{{- end }}
{{- end }}

{{/*
Which workload: a StatefulSet when each replica needs its own claim, else a Deployment
(with an emptyDir, or the one existing claim).
*/}}
{{- define "events-bridge.statefulSet" -}}
{{- if and .Values.persistence.enabled (not .Values.persistence.existingClaim) }}true{{ end }}
{{- end }}

{{/*
The grace period covers everything SIGTERM sets off: the preStop sleep, in-flight requests
(shutdownTimeout), the outbox replay (drainSeconds) and a margin. A native sidecar is stopped only
after the app has exited, so the app's time adds up; regular containers stop side by side.
*/}}
{{- define "events-bridge.gracePeriod" -}}
{{- $b := .Values.bridge }}
{{- $bridge := add (int $b.preStopSleepSeconds) (int $b.shutdownTimeout) (int $b.drainSeconds) (int $b.gracePeriodMarginSeconds) }}
{{- if and .Values.sidecar.enabled .Values.sidecar.native }}
{{- add $bridge (int .Values.sidecar.appStopSeconds) }}
{{- else if .Values.sidecar.enabled }}
{{- max $bridge (int .Values.sidecar.appStopSeconds) }}
{{- else }}
{{- $bridge }}
{{- end }}
{{- end }}

{{/* Values that cannot work together fail the render with a sentence saying why. */}}
{{- define "events-bridge.validate" -}}
{{- range $name := list "BRIDGE_PORT" "BRIDGE_SHUTDOWN_TIMEOUT" "BRIDGE_DRAIN_SECONDS" }}
{{- if hasKey $.Values.bridge.env $name }}
{{- fail (printf "bridge.env.%s: set it through bridge.port, bridge.shutdownTimeout or bridge.drainSeconds (the probes and the grace period follow those)" $name) }}
{{- end }}
{{- end }}
{{- if and .Values.persistence.existingClaim (ne (int .Values.replicaCount) 1) }}
{{- fail "persistence.existingClaim holds one outbox, for one daemon: set replicaCount=1 (or persistence.enabled=true without a claim for a volume per replica)" }}
{{- end }}
{{- if and .Values.secret.create .Values.secret.existingSecret }}
{{- fail "secret.create and secret.existingSecret: choose one" }}
{{- end }}
{{- if and .Values.secret.create (not .Values.secret.amqpUrl) }}
{{- fail "secret.create needs secret.amqpUrl" }}
{{- end }}
{{- if and .Values.secret.create (not .Values.secret.clientIds) (not .Values.bridge.clientIds) }}
{{- fail "secret.create needs secret.clientIds (or bridge.clientIds)" }}
{{- end }}
{{- with .Values.journal }}
{{- if and .url (gt (int $.Values.replicaCount) 1) (not .allowReplicas) }}
{{- fail (printf "journal.url with replicaCount=%d: every replica would pull the whole journal and publish each event %d times (each keeps its own position and deduplicates alone). Set replicaCount=1 (with persistence.enabled=true, so the position survives new pods), or journal.allowReplicas=true if your consumers drop duplicates by message_id" (int $.Values.replicaCount) (int $.Values.replicaCount)) }}
{{- end }}
{{- if and .url $.Values.secret.create (not .ims.existingSecret) }}
{{- fail "journal.url with secret.create: the chart-made Secret holds no IMS credential; create a Secret with it and name it in journal.ims.existingSecret" }}
{{- end }}
{{- end }}
{{- if and .Values.sidecar.enabled (not .Values.sidecar.containers) }}
{{- fail "sidecar.enabled needs sidecar.containers: your app's containers" }}
{{- end }}
{{- if and .Values.tls.server.clientCa (not .Values.tls.server.secretName) }}
{{- fail "tls.server.clientCa needs tls.server.secretName: client certificates are asked for over HTTPS" }}
{{- end }}
{{- with .Values.tls.broker }}
{{- if and .secretName (not .ca) (not .clientCertificate) }}
{{- fail "tls.broker.secretName: set tls.broker.ca or tls.broker.clientCertificate (or neither the Secret)" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Where the journal's position is kept (BRIDGE_JOURNAL_STATE_DIR, the image's too). */}}
{{- define "events-bridge.journalDir" -}}/var/lib/events-bridge/journal{{- end }}

{{/* Where the TLS Secrets are mounted (read-only). */}}
{{- define "events-bridge.tlsDir" -}}/etc/ssl/events-bridge/{{ . }}{{- end }}

{{/* The environment for TLS (SPEC §8): the files of the mounted Secrets, as the shipped config reads them. */}}
{{- define "events-bridge.tlsEnv" -}}
{{- $env := dict }}
{{- $server := include "events-bridge.tlsDir" "server" }}
{{- $broker := include "events-bridge.tlsDir" "broker" }}
{{- with .Values.tls.server }}
{{- if .secretName }}
{{- $_ := set $env "BRIDGE_TLS_CERT_FILE" (printf "%s/tls.crt" $server) }}
{{- $_ := set $env "BRIDGE_TLS_KEY_FILE" (printf "%s/tls.key" $server) }}
{{- if .clientCa }}
{{- $_ := set $env "BRIDGE_TLS_CLIENT_CA_FILE" (printf "%s/ca.crt" $server) }}
{{- $_ := set $env "BRIDGE_HEALTHCHECK_CERT_FILE" (printf "%s/probe.crt" $server) }}
{{- $_ := set $env "BRIDGE_HEALTHCHECK_KEY_FILE" (printf "%s/probe.key" $server) }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.tls.broker }}
{{- if and .secretName .ca }}
{{- $_ := set $env "BRIDGE_AMQP_CA_FILE" (printf "%s/ca.crt" $broker) }}
{{- end }}
{{- if and .secretName .clientCertificate }}
{{- $_ := set $env "BRIDGE_AMQP_CERT_FILE" (printf "%s/tls.crt" $broker) }}
{{- $_ := set $env "BRIDGE_AMQP_KEY_FILE" (printf "%s/tls.key" $broker) }}
{{- end }}
{{- end }}
{{- toJson $env }}
{{- end }}

{{/*
A probe of `path`: HTTP, HTTPS with tls.server (kubelet does not verify), or under mTLS the
image's healthcheck, which presents the probe certificate (kubelet's HTTP probes cannot).
*/}}
{{- define "events-bridge.probe" -}}
{{- $tls := .root.Values.tls.server }}
{{- if and $tls.secretName $tls.clientCa }}
exec:
  command: [/usr/local/bin/events-bridge-healthcheck, {{ .path }}]
{{- else }}
httpGet:
  path: {{ .path }}
  port: {{ .root.Values.bridge.port | int }}
  {{- if $tls.secretName }}
  scheme: HTTPS
  {{- end }}
{{- end }}
{{- end }}

{{/* The bridge's environment: what the shipped config reads. */}}
{{- define "events-bridge.env" -}}
{{- $b := .Values.bridge }}
{{- $secret := include "events-bridge.secretName" . }}
{{- if not (hasKey $b.env "BRIDGE_AMQP_URL") }}
- name: BRIDGE_AMQP_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.secret.amqpUrlKey }}
{{- end }}
{{- if hasKey $b.env "BRIDGE_CLIENT_IDS" }}
{{- else if $b.clientIds }}
- name: BRIDGE_CLIENT_IDS
  value: {{ $b.clientIds | quote }}
{{- else }}
- name: BRIDGE_CLIENT_IDS
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.secret.clientIdsKey }}
{{- end }}
{{- $plain := dict
  "BRIDGE_KEY_BASE_URL" $b.keyBaseUrl
  "BRIDGE_HOST" "0.0.0.0"
  "BRIDGE_OUTBOX_DIR" "/var/lib/events-bridge/outbox"
  "BRIDGE_LOG_FORMAT" $b.logFormat
}}
{{- $plain = merge $plain (include "events-bridge.tlsEnv" . | fromJson) }}
{{- with .Values.journal }}
{{- if .url }}
{{- $_ := set $plain "BRIDGE_JOURNAL_URL" .url }}
{{- $_ := set $plain "BRIDGE_JOURNAL_START" (default "latest" .start) }}
{{- $_ := set $plain "BRIDGE_JOURNAL_STATE_DIR" (include "events-bridge.journalDir" $) }}
{{- with .ims.tokenUrl }}
{{- $_ := set $plain "BRIDGE_IMS_TOKEN_URL" . }}
{{- end }}
{{- with .ims.scopes }}
{{- $_ := set $plain "BRIDGE_IMS_SCOPES" . }}
{{- end }}
{{- $imsSecret := default $secret .ims.existingSecret }}
{{- range $name, $key := dict "BRIDGE_IMS_CLIENT_ID" .ims.clientIdKey "BRIDGE_IMS_CLIENT_SECRET" .ims.clientSecretKey "BRIDGE_IMS_ORG_ID" .ims.orgIdKey }}
{{- if not (hasKey $b.env $name) }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $imsSecret }}
      key: {{ $key }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name, $value := merge (deepCopy $b.env) $plain }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
- name: BRIDGE_PORT
  value: {{ $b.port | int | toString | quote }}
- name: BRIDGE_SHUTDOWN_TIMEOUT
  value: {{ $b.shutdownTimeout | int | toString | quote }}
- name: BRIDGE_DRAIN_SECONDS
  value: {{ $b.drainSeconds | int | toString | quote }}
{{- with $b.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The bridge container. `native` adds restartPolicy: Always (a native sidecar). */}}
{{- define "events-bridge.container" -}}
{{- $b := .Values.bridge -}}
- name: events-bridge
  image: {{ include "events-bridge.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if and .Values.sidecar.enabled .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  args:
    - serve
    - --config
    - /etc/events-bridge/bridge.yaml
    {{- if gt (int $b.workers) 1 }}
    - --workers
    - {{ $b.workers | int | toString | quote }}
    {{- end }}
  {{- if .Values.declareContainerPort }}
  ports:
    - name: bridge-http
      containerPort: {{ $b.port | int }}
      protocol: TCP
  {{- end }}
  env:
    {{- include "events-bridge.env" . | trim | nindent 4 }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    privileged: false
    capabilities:
      drop: [ALL]
    seccompProfile:
      type: RuntimeDefault
  startupProbe:
    {{- include "events-bridge.probe" (dict "root" . "path" "/healthz") | nindent 4 }}
    {{- toYaml .Values.startupProbe | nindent 4 }}
  livenessProbe:
    {{- include "events-bridge.probe" (dict "root" . "path" "/healthz") | nindent 4 }}
    {{- toYaml .Values.livenessProbe | nindent 4 }}
  readinessProbe:
    {{- include "events-bridge.probe" (dict "root" . "path" "/readyz") | nindent 4 }}
    {{- toYaml .Values.readinessProbe | nindent 4 }}
  {{- if gt (int $b.preStopSleepSeconds) 0 }}
  lifecycle:
    preStop:
      sleep:
        seconds: {{ $b.preStopSleepSeconds | int }}
  {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  volumeMounts:
    - name: events-bridge-config
      mountPath: /etc/events-bridge
      readOnly: true
    - name: events-bridge-outbox
      mountPath: /var/lib/events-bridge/outbox
    {{- if .Values.journal.url }}
    # The journal's position: the folder `journal` of the outbox's volume (values.yaml, journal).
    - name: events-bridge-outbox
      mountPath: {{ include "events-bridge.journalDir" . }}
      subPath: journal
    {{- end }}
    - name: events-bridge-tmp
      mountPath: /tmp
    {{- range $side := list "server" "broker" }}
    {{- if (index $.Values.tls $side).secretName }}
    - name: events-bridge-tls-{{ $side }}
      mountPath: {{ include "events-bridge.tlsDir" $side }}
      readOnly: true
    {{- end }}
    {{- end }}
{{- end }}

{{/* The Pod template (metadata and spec) shared by the Deployment and the StatefulSet. */}}
{{- define "events-bridge.podTemplate" -}}
metadata:
  labels:
    {{- include "events-bridge.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # A changed config (or chart-made Secret) rolls the pods; the daemon also reloads routes on SIGHUP.
    checksum/config: {{ include "events-bridge.configText" . | sha256sum }}
    {{- if .Values.secret.create }}
    checksum/secret: {{ list .Values.secret.amqpUrl .Values.secret.clientIds | toJson | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "events-bridge.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
  terminationGracePeriodSeconds: {{ include "events-bridge.gracePeriod" . }}
  {{- with .Values.restartPolicy }}
  restartPolicy: {{ . }}
  {{- end }}
  {{- if .Values.hostNetwork }}
  hostNetwork: true
  dnsPolicy: ClusterFirstWithHostNet
  {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- if .Values.sidecar.enabled }}
  {{- if or .Values.sidecar.native .Values.sidecar.initContainers }}
  initContainers:
    {{- if .Values.sidecar.native }}
    {{- include "events-bridge.container" . | nindent 4 }}
    {{- end }}
    {{- with .Values.sidecar.initContainers }}
    {{- tpl (toYaml .) $ | nindent 4 }}
    {{- end }}
  {{- end }}
  containers:
    {{- tpl (toYaml .Values.sidecar.containers) . | nindent 4 }}
    {{- if not .Values.sidecar.native }}
    {{- include "events-bridge.container" . | nindent 4 }}
    {{- end }}
  {{- else }}
  containers:
    {{- include "events-bridge.container" . | nindent 4 }}
  {{- end }}
  volumes:
    - name: events-bridge-config
      configMap:
        name: {{ include "events-bridge.fullname" . }}
    {{- if .Values.persistence.existingClaim }}
    - name: events-bridge-outbox
      persistentVolumeClaim:
        claimName: {{ .Values.persistence.existingClaim }}
    {{- else if not (include "events-bridge.statefulSet" .) }}
    - name: events-bridge-outbox
      emptyDir:
        sizeLimit: {{ .Values.persistence.emptyDirSizeLimit }}
    {{- end }}
    - name: events-bridge-tmp
      emptyDir:
        sizeLimit: {{ .Values.persistence.tmpSizeLimit }}
    {{- range $side := list "server" "broker" }}
    {{- with (index $.Values.tls $side).secretName }}
    - name: events-bridge-tls-{{ $side }}
      secret:
        secretName: {{ . }}
        defaultMode: 0440  # the daemon's group (fsGroup) reads them; nobody writes them
    {{- end }}
    {{- end }}
    {{- with .Values.sidecar.volumes }}
    {{- if $.Values.sidecar.enabled }}
    {{- tpl (toYaml .) $ | nindent 4 }}
    {{- end }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
