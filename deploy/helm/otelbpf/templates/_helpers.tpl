{{/* The release's name, with the chart's unless the release already says otelbpf. */}}
{{- define "otelbpf.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "otelbpf.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "otelbpf.labels" -}}
{{ include "otelbpf.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "otelbpf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "otelbpf.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The agent's config: the user's, plus what the pod spec depends on. */}}
{{- define "otelbpf.config" -}}
{{- $fixed := dict "health" (printf "127.0.0.1:%v" .Values.healthPort) "lock_file" "/run/otelbpf/otelbpf.lock" -}}
{{- toYaml (merge $fixed .Values.config) -}}
{{- end -}}
