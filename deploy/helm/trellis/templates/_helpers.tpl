{{/* Names, labels and shared pieces of the Trellis chart. */}}

{{- define "trellis.fullname" -}}
{{- if contains "trellis" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-trellis" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The control plane's Deployment, Service, ServiceAccount, Role and RoleBinding. */}}
{{- define "trellis.controlPlane" -}}
{{- printf "%s-control-plane" (include "trellis.fullname" .) -}}
{{- end -}}

{{/*
The control plane's ClusterRole and ClusterRoleBinding: cluster-scoped, so named with the
release's namespace too, as the webhook configurations are; releases of one name in two
namespaces would otherwise share (and overwrite) them.
*/}}
{{- define "trellis.clusterControlPlane" -}}
{{- printf "%s-%s" (include "trellis.controlPlane" .) .Release.Namespace -}}
{{- end -}}

{{/*
The Secret holding the mesh CA, which the control plane creates (the chart never renders it); it
may read and update only this one.
*/}}
{{- define "trellis.caSecret" -}}
{{- printf "%s-ca" (include "trellis.fullname" .) -}}
{{- end -}}

{{/*
The Secret holding the webhooks' serving certificate: webhook.existingSecret when given; with
cert-manager the one its Certificate writes (another name than the chart's own Secret, so that
switching to cert-manager on an upgrade never has Helm delete the Secret cert-manager writes);
else the chart's.
*/}}
{{- define "trellis.webhookSecret" -}}
{{- if .Values.webhook.existingSecret -}}
{{- .Values.webhook.existingSecret -}}
{{- else if .Values.webhook.certManager.enabled -}}
{{- include "trellis.webhookCertificate" . -}}
{{- else -}}
{{- printf "%s-webhook-tls" (include "trellis.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The cert-manager Certificate of the webhooks' serving certificate, and its Secret. */}}
{{- define "trellis.webhookCertificate" -}}
{{- printf "%s-webhook-cert" (include "trellis.fullname" .) -}}
{{- end -}}

{{/*
Which serving certificate the webhooks use, after checking that the values agree: certManager,
existingSecret or generated.
*/}}
{{- define "trellis.webhookCertMode" -}}
{{- $w := .Values.webhook -}}
{{- if and $w.existingSecret (not $w.caBundle) -}}
{{- fail "webhook.existingSecret is set without webhook.caBundle: set both (the Secret of the serving certificate, and the PEM of the CA that signed it, which the API server trusts), or neither" -}}
{{- end -}}
{{- if and $w.caBundle (not $w.existingSecret) -}}
{{- fail "webhook.caBundle is set without webhook.existingSecret: set both (the Secret of the serving certificate, and the PEM of the CA that signed it, which the API server trusts), or neither" -}}
{{- end -}}
{{- if and $w.certManager.enabled $w.existingSecret -}}
{{- fail "webhook.certManager.enabled and webhook.existingSecret exclude each other: cert-manager writes the Secret itself" -}}
{{- end -}}
{{- if $w.certManager.enabled -}}
certManager
{{- else if $w.existingSecret -}}
existingSecret
{{- else -}}
generated
{{- end -}}
{{- end -}}

{{/* The ConfigMap of the trust anchors (trustAnchorsPEM). */}}
{{- define "trellis.trustAnchors" -}}
{{- printf "%s-trust-anchors" (include "trellis.fullname" .) -}}
{{- end -}}

{{- define "trellis.injectConfig" -}}
{{- printf "%s-inject" (include "trellis.fullname" .) -}}
{{- end -}}

{{/* The mesh's root namespace: rootNamespace, else the release's. */}}
{{- define "trellis.rootNamespace" -}}
{{- default .Release.Namespace .Values.rootNamespace -}}
{{- end -}}

{{/*
The image of every role: repository@digest when image.digest is set (the tag is then ignored),
else repository:tag, the tag defaulting to the chart's appVersion.
*/}}
{{- define "trellis.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
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

{{/*
The milliseconds in a duration value of the form the schema allows (a number with ms, s, m or h,
or several: 1h30m), as text; 0 for the number 0.
*/}}
{{- define "trellis.milliseconds" -}}
{{- $ms := 0 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" (toString .) -1 -}}
{{- $unit := regexFind "[a-z]+$" . -}}
{{- $n := trimSuffix $unit . | atoi -}}
{{- $per := get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit -}}
{{- $ms = add $ms (mul $n $per) -}}
{{- end -}}
{{- $ms -}}
{{- end -}}

{{/*
A Kubernetes quantity of the form the schema allows (100m, 0.5, 64Mi, 1e3, or a number) as a
floating-point number, as text, for comparing a request with its limit. A decimal suffix below
one divides rather than multiplies, so 300m and 0.3 give the same number.
*/}}
{{- define "trellis.quantity" -}}
{{- $text := toString . -}}
{{- $suffix := regexFind "([KMGTPE]i|[numkMGTPE])$" $text -}}
{{- $number := float64 (trimSuffix $suffix $text) -}}
{{- $multiply := get (dict "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0) $suffix | default 1.0 -}}
{{- $divide := get (dict "n" 1e9 "u" 1e6 "m" 1e3) $suffix | default 1.0 -}}
{{- divf (mulf $number $multiply) $divide -}}
{{- end -}}

{{/*
Refuses resources (dict "resources" the value, "name" its path, "refused" what the API server
would refuse) whose cpu, memory or ephemeral-storage request is above its limit: the API server refuses a container
so made, long after the chart rendered. The control plane checks the injected containers' again
at start (the authority, comparing exactly); here the comparison is of floating-point numbers,
which a request must exceed its limit by more than a part in 10^12 to fail.
*/}}
{{- define "trellis.checkResources" -}}
{{- $requests := .resources.requests | default dict -}}
{{- $limits := .resources.limits | default dict -}}
{{- range $resource := list "cpu" "memory" "ephemeral-storage" -}}
{{- $request := get $requests $resource -}}
{{- $limit := get $limits $resource -}}
{{- if and (ne (toString $request) "") (ne (toString $limit) "") -}}
{{- $r := include "trellis.quantity" $request | float64 -}}
{{- $l := include "trellis.quantity" $limit | float64 -}}
{{- if gt $r (mulf $l 1.000000000001) -}}
{{- fail (printf "%s: requests.%s %s is above limits.%s %s: the API server would refuse %s; raise the limit or lower the request" $.name $resource (toString $request) $resource (toString $limit) $.refused) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Refuses a PEM value (dict "pem" the value, "name" its path, "becomes" where it is published,
"give" what to set instead) that holds a private key, or no certificate; empty passes. Checked
here, not by a schema pattern, whose refusal would echo the value, key and all.
*/}}
{{- define "trellis.checkCertificatesOnly" -}}
{{- if contains "PRIVATE KEY" .pem -}}
{{- fail (printf "%s holds a private key: it becomes %s; give certificates only" .name .becomes) -}}
{{- end -}}
{{- if and .pem (not (contains "-----BEGIN CERTIFICATE-----" .pem)) -}}
{{- fail (printf "%s holds no PEM certificate (-----BEGIN CERTIFICATE-----): set it to %s" .name .give) -}}
{{- end -}}
{{- end -}}

{{/*
Refuses a map the operator gives (dict "given" the map, "name" its value's path, "own" the keys
the chart writes in the same place, "where" that place) that repeats one of the chart's own keys.
Rendered, the object would hold the key twice: Helm and kubectl keep the later silently (the
operator's value, undoing what the chart's is for, such as a checksum that rolls the pods) or
an API server refuses the object. Refused rather than merged either way: the operator's value
would be dropped without a word, or the chart's. Names the key, never the value.
*/}}
{{- define "trellis.checkOwnKeys" -}}
{{- range $key := .own -}}
{{- if hasKey ($.given | default dict) $key -}}
{{- fail (printf "%s: %q is set by the chart itself, on %s; remove it from %s, or give another key" $.name $key $.where $.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Values the schema cannot relate or add up; checked before anything renders, each failure naming
the values. certTTL: the control plane refuses a --cert-ttl outside 10s..720h (30 days) with exit
64, so a release that passed would never start; watchFailureGrace and grpcIdleTimeout below 1s
likewise;
injection.tcpUserTimeout outside 0 or 80s..1h likewise (the control plane refuses the injection
settings). antiAffinity hard with one replica: a rollout stops that replica before its
replacement runs, and pods created meanwhile are refused (or, under Ignore, get no sidecar).
One replica with injection.failurePolicy Fail, unless injection.singleReplicaAccepted: a drain of
its node (the PodDisruptionBudget lets it go) or a crash refuses every pod of the meshed
namespaces until it runs again.
Resources with a request above its limit: the API server would refuse the control plane's
Deployment, or every injected pod.
podDisruptionBudget.maxUnavailable 0 (or 0%): no replica could ever be evicted, so every drain
of a node running one would wait for ever.
podAnnotations, metrics.podMonitor.labels and metrics.sidecarPodMonitor.labels repeating a key
the chart writes there (trellis.checkOwnKeys).
trustAnchorsPEM without a certificate: the control plane would exit 64; with a private key: a key
would be published in a ConfigMap. webhook.caBundle likewise: without a certificate the API server
could call no webhook; with a key, the key would be published in the webhook configurations.
*/}}
{{- define "trellis.checkValues" -}}
{{- $ms := include "trellis.milliseconds" .Values.certTTL | int64 -}}
{{- if or (lt $ms 10000) (gt $ms 2592000000) -}}
{{- fail (printf "certTTL %s is outside 10s..720h: the control plane issues certificates for at least 10 seconds and at most 30 days" (toString .Values.certTTL)) -}}
{{- end -}}
{{- $ms = include "trellis.milliseconds" .Values.watchFailureGrace | int64 -}}
{{- if lt $ms 1000 -}}
{{- fail (printf "watchFailureGrace %s is shorter than 1s: the control plane refuses a shorter --watch-failure-grace and would exit at start" (toString .Values.watchFailureGrace)) -}}
{{- end -}}
{{- $ms = include "trellis.milliseconds" .Values.grpcIdleTimeout | int64 -}}
{{- if lt $ms 1000 -}}
{{- fail (printf "grpcIdleTimeout %s is shorter than 1s: the control plane refuses a shorter --grpc-idle-timeout and would exit at start" (toString .Values.grpcIdleTimeout)) -}}
{{- end -}}
{{- $ms = include "trellis.milliseconds" .Values.injection.tcpUserTimeout | int64 -}}
{{- if and (gt $ms 0) (or (lt $ms 80000) (gt $ms 3600000)) -}}
{{- fail (printf "injection.tcpUserTimeout %s is outside 80s..1h: give 0 to turn the sidecars' TCP user timeout off, or at least 80s (below it keepalive resets an idle connection on one lost probe) and at most 1h" (toString .Values.injection.tcpUserTimeout)) -}}
{{- end -}}
{{- include "trellis.checkCertificatesOnly" (dict "pem" .Values.trustAnchorsPEM "name" "trustAnchorsPEM" "becomes" "a ConfigMap, which anyone who can read the namespace reads" "give" "the roots to trust, e.g. --set-file trustAnchorsPEM=roots.pem") -}}
{{- include "trellis.checkCertificatesOnly" (dict "pem" .Values.webhook.caBundle "name" "webhook.caBundle" "becomes" "the caBundle of the webhook configurations, cluster-wide objects that many can read" "give" "the certificate of the CA that signed webhook.existingSecret, e.g. --set-file webhook.caBundle=ca.crt") -}}
{{- include "trellis.checkResources" (dict "resources" .Values.resources "name" "resources" "refused" "the control plane's Deployment") -}}
{{- include "trellis.checkResources" (dict "resources" .Values.injection.proxy.resources "name" "injection.proxy.resources" "refused" "every injected pod") -}}
{{- include "trellis.checkResources" (dict "resources" .Values.injection.init.resources "name" "injection.init.resources" "refused" "every injected pod") -}}
{{- if and .Values.podDisruptionBudget.enabled (regexMatch "^0+%?$" (toString .Values.podDisruptionBudget.maxUnavailable)) -}}
{{- fail (printf "podDisruptionBudget.maxUnavailable %s lets no control-plane replica be evicted: every drain of a node running one would wait for ever; give 1 or more (or 50%%), or podDisruptionBudget.enabled=false" (toString .Values.podDisruptionBudget.maxUnavailable)) -}}
{{- end -}}
{{- include "trellis.checkOwnKeys" (dict "given" .Values.podAnnotations "name" "podAnnotations" "own" (list "checksum/inject-config" "checksum/trust-anchors") "where" "the control plane's pods (a checksum of settings read at start, so that a change rolls them)") -}}
{{- $chartLabels := include "trellis.labels" . | fromYaml | keys | sortAlpha -}}
{{- if .Values.metrics.podMonitor.enabled -}}
{{- include "trellis.checkOwnKeys" (dict "given" .Values.metrics.podMonitor.labels "name" "metrics.podMonitor.labels" "own" $chartLabels "where" "the PodMonitor") -}}
{{- end -}}
{{- if .Values.metrics.sidecarPodMonitor.enabled -}}
{{- include "trellis.checkOwnKeys" (dict "given" .Values.metrics.sidecarPodMonitor.labels "name" "metrics.sidecarPodMonitor.labels" "own" $chartLabels "where" "the sidecars' PodMonitor") -}}
{{- end -}}
{{- if and (eq .Values.antiAffinity "hard") (lt (int .Values.replicas) 2) -}}
{{- fail "antiAffinity: hard needs replicas: 2 or more: with one replica a rollout stops it before its replacement can run, and pods created meanwhile are refused or get no sidecar" -}}
{{- end -}}
{{- if and (eq .Values.injection.failurePolicy "Fail") (lt (int .Values.replicas) 2) (not .Values.injection.singleReplicaAccepted) -}}
{{- fail "replicas: 1 with injection.failurePolicy: Fail refuses every pod of the meshed namespaces whenever that replica is down (each drain of its node, each crash): set replicas: 2 or more, or injection.singleReplicaAccepted: true to accept it (a test cluster), or injection.failurePolicy: Ignore to let such pods start without a sidecar" -}}
{{- end -}}
{{- end -}}
