{{/* Names, labels and shared pieces of the Trellis chart. */}}

{{- define "trellis.fullname" -}}
{{- if contains "trellis" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-trellis" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The control plane's Deployment, Service, ServiceAccount and RBAC objects. */}}
{{- define "trellis.controlPlane" -}}
{{- printf "%s-control-plane" (include "trellis.fullname" .) -}}
{{- end -}}

{{/* The Secret holding the mesh CA; the control plane may read and write only this one. */}}
{{- define "trellis.caSecret" -}}
{{- printf "%s-ca" (include "trellis.fullname" .) -}}
{{- end -}}

{{/* The Secret holding the webhooks' serving certificate. */}}
{{- define "trellis.webhookSecret" -}}
{{- printf "%s-webhook-tls" (include "trellis.fullname" .) -}}
{{- end -}}

{{- define "trellis.injectConfig" -}}
{{- printf "%s-inject" (include "trellis.fullname" .) -}}
{{- end -}}

{{- define "trellis.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "trellis.selectorLabels" -}}
app.kubernetes.io/name: trellis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end -}}

{{- define "trellis.labels" -}}
app.kubernetes.io/name: trellis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Namespaces the injection webhooks never see. */}}
{{- define "trellis.excludedNamespaces" -}}
{{- $names := list .Release.Namespace "kube-system" -}}
{{- range .Values.injection.excludeNamespaces }}{{ $names = append $names . }}{{ end -}}
{{- toJson ($names | uniq) -}}
{{- end -}}
