{{/*
Names. Kubernetes names are limited to 63 characters; every name derived from
the fullname keeps a suffix, so the prefix is cut at 52.
*/}}
{{- define "sidekey.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sidekey.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sidekey.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sidekey.operator.fullname" -}}
{{- printf "%s-operator" (include "sidekey.fullname" .) }}
{{- end }}

{{- define "sidekey.webhook.fullname" -}}
{{- printf "%s-webhook" (include "sidekey.fullname" .) }}
{{- end }}

{{- define "sidekey.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "sidekey.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sidekey.webhook.serviceAccountName" -}}
{{- if .Values.webhook.serviceAccount.create }}
{{- default (include "sidekey.webhook.fullname" .) .Values.webhook.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.webhook.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The webhook's TLS Secret and its settings ConfigMap. The Secret name is
contract.WEBHOOK_TLS_SECRET when the release is called "sidekey".
*/}}
{{- define "sidekey.webhook.tlsSecretName" -}}
{{- printf "%s-webhook-tls" (include "sidekey.fullname" .) }}
{{- end }}

{{- define "sidekey.webhook.settingsName" -}}
{{- printf "%s-webhook-settings" (include "sidekey.fullname" .) }}
{{- end }}

{{/* The MutatingWebhookConfiguration: cluster-scoped, so named per release. */}}
{{- define "sidekey.webhook.configurationName" -}}
{{- include "sidekey.fullname" . }}
{{- end }}

{{/*
Labels. `component` is passed in: labels (dict "ctx" $ "component" "webhook").
*/}}
{{- define "sidekey.labels" -}}
helm.sh/chart: {{ include "sidekey.chart" .ctx }}
{{ include "sidekey.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: sidekey
{{- end }}

{{- define "sidekey.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sidekey.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/* Images. */}}
{{- define "sidekey.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "sidekey.sidecarImage" -}}
{{- $repo := default .Values.image.repository .Values.sidecar.image.repository }}
{{- if .Values.sidecar.image.digest }}
{{- printf "%s@%s" $repo .Values.sidecar.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default (default .Chart.AppVersion .Values.image.tag) .Values.sidecar.image.tag) }}
{{- end }}
{{- end }}

{{/* The images a sidecar may run: the default one first, then the allow-list, deduplicated. */}}
{{- define "sidekey.sidecarImages" -}}
{{- prepend .Values.sidecar.imageAllowList (include "sidekey.sidecarImage" .) | uniq | toJson }}
{{- end }}

{{/* Namespaces the webhook never injects into. */}}
{{- define "sidekey.excludedNamespaces" -}}
{{- concat (include "sidekey.contract.systemNamespaces" . | fromJsonArray) (list .Release.Namespace) .Values.webhook.excludedNamespaces | uniq | toJson }}
{{- end }}

{{/*
The pod security context shared by the operator, webhook and test pods: the
image's non-root numeric UID, no privilege escalation, a read-only root.
*/}}
{{- define "sidekey.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "sidekey.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}
