{{/* Names: <release>-edge-agent unless the release name holds the chart's name already. */}}
{{- define "edge-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "edge-agent.fullname" -}}
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

{{- define "edge-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edge-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "edge-agent.labels" -}}
{{ include "edge-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* The ConfigMap holding config.yaml: made elsewhere, or by this chart. */}}
{{- define "edge-agent.configMapName" -}}
{{- .Values.config.existingConfigMap | default (printf "%s-config" (include "edge-agent.fullname" .)) }}
{{- end }}

{{/* The Secret mounted at secrets.mountPath: made by this chart, made elsewhere, or none (""). */}}
{{- define "edge-agent.secretName" -}}
{{- if .Values.secrets.create }}
{{- printf "%s-secrets" (include "edge-agent.fullname" .) }}
{{- else }}
{{- .Values.secrets.existingSecret }}
{{- end }}
{{- end }}

{{/* pvc or hostPath: the outbox's volume. */}}
{{- define "edge-agent.persistenceType" -}}
{{- .Values.persistence.type | default (ternary "hostPath" "pvc" (eq .Values.kind "DaemonSet")) }}
{{- end }}

{{- define "edge-agent.claimName" -}}
{{- .Values.persistence.pvc.existingClaim | default (printf "%s-state" (include "edge-agent.fullname" .)) }}
{{- end }}

{{/* Refuse what would render a workload that cannot run, or runs where it must not. */}}
{{- define "edge-agent.validate" -}}
{{- if and (eq .Values.kind "DaemonSet") (not .Values.nodeSelector) }}
{{- fail "kind: DaemonSet needs a nodeSelector (e.g. edge-agent/group: pump-skids): without one it starts an agent on every node" }}
{{- end }}
{{- if and (eq .Values.kind "DaemonSet") (eq (include "edge-agent.persistenceType" .) "pvc") }}
{{- fail "kind: DaemonSet keeps the outbox on each node (persistence.type: hostPath): one PVC cannot serve every node" }}
{{- end }}
{{- if not (or .Values.config.existingConfigMap .Values.config.values .Values.config.inline) }}
{{- fail "config: give config.inline (the file's text), config.values (a mapping) or config.existingConfigMap (a ConfigMap's name)" }}
{{- end }}
{{- $sources := 0 }}
{{- range (list .Values.models.binaryData .Values.models.existingConfigMap .Values.models.volume) }}
{{- if . }}{{ $sources = add1 $sources }}{{ end }}
{{- end }}
{{- if gt $sources 1 }}
{{- fail "models: give one of binaryData, existingConfigMap or volume" }}
{{- end }}
{{- if .Values.secrets.create }}
{{- range $var, $key := .Values.secrets.env }}
{{- if not (hasKey $.Values.secrets.create $key) }}
{{- fail (printf "secrets.env.%s names the key %q, which secrets.create does not have" $var $key) }}
{{- end }}
{{- end }}
{{- else if and .Values.secrets.env (not .Values.secrets.existingSecret) }}
{{- fail "secrets.env takes variables from a Secret: give secrets.create or secrets.existingSecret (or secrets.env: {})" }}
{{- end }}
{{- end }}
