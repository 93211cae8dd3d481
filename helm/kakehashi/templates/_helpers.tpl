{{/* Chart name, truncated for label values. */}}
{{- define "kakehashi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; object names append -coordinator, -relay, ... to it. */}}
{{- define "kakehashi.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "relay"). */}}
{{- define "kakehashi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kakehashi.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component: (dict "ctx" $ "component" "relay"). */}}
{{- define "kakehashi.labels" -}}
{{ include "kakehashi.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: kakehashi
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* image reference: (dict "ctx" $ "image" .Values.relay.image). */}}
{{- define "kakehashi.image" -}}
{{- $tag := .image.tag | default .ctx.Values.imageTag | default .ctx.Chart.AppVersion -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end }}

{{- define "kakehashi.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kakehashi.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* etcd client URLs, comma separated: the in-chart member, or the external ones. */}}
{{- define "kakehashi.etcdEndpoints" -}}
{{- if .Values.etcd.inChart.enabled -}}
{{- printf "http://%s-etcd:2379" (include "kakehashi.fullname" .) -}}
{{- else -}}
{{- required "etcd.endpoints (or etcd.inChart.enabled) is required: relays register in etcd and coordinators place sessions from it" (join "," .Values.etcd.endpoints) -}}
{{- end -}}
{{- end }}

{{/* Name of the Secret that holds the signing seed. */}}
{{- define "kakehashi.adminKeySecretName" -}}
{{- if .Values.auth.bootstrapAdminKey.existingSecret }}
{{- .Values.auth.bootstrapAdminKey.existingSecret }}
{{- else }}
{{- printf "%s-bootstrap-admin-key" (include "kakehashi.fullname" .) }}
{{- end }}
{{- end }}

{{- define "kakehashi.signingSecretName" -}}
{{- if .Values.signingKey.existingSecret }}
{{- .Values.signingKey.existingSecret }}
{{- else }}
{{- printf "%s-signing-key" (include "kakehashi.fullname" .) }}
{{- end }}
{{- end }}

{{/* Name of the Secret that holds the Redis URL, when the chart makes one. */}}
{{- define "kakehashi.redisSecretName" -}}
{{- if .Values.redis.existingSecret }}
{{- .Values.redis.existingSecret }}
{{- else }}
{{- printf "%s-redis" (include "kakehashi.fullname" .) }}
{{- end }}
{{- end }}

{{/* The Redis URL the chart stores in its Secret ("" when cluster nodes are used). */}}
{{- define "kakehashi.redisURL" -}}
{{- if .Values.redis.inChart.enabled -}}
{{- printf "redis://%s-redis:6379" (include "kakehashi.fullname" .) -}}
{{- else -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- end }}

{{/* Pod and container security settings shared by every Kakehashi container. */}}
{{- define "kakehashi.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "kakehashi.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/*
Standard OpenTelemetry variables, when tracing.otlpEndpoint is set:
(dict "ctx" $ "service" "kakehashi-relay"). Needs POD_NAME defined earlier in the env list.
*/}}
{{- define "kakehashi.otelEnv" -}}
{{- $t := .ctx.Values.tracing }}
{{- if $t.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $t.otlpEndpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: grpc
- name: OTEL_SERVICE_NAME
  value: {{ .service | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.name=$(POD_NAME),k8s.namespace.name={{ .ctx.Release.Namespace }},service.version={{ .ctx.Chart.AppVersion }}"
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $t.sampleRatio | toString | quote }}
{{- end }}
{{- end }}
