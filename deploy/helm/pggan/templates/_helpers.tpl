{{/* Names and labels. */}}
{{- define "pggan.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pggan.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pggan.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pggan.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pggan.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "pggan.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "pggan.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Ray Train workers: one per GPU, or one per pod for CPU workers. */}}
{{- define "pggan.numWorkers" -}}
{{- mul (int .Values.worker.replicas) (max 1 (int .Values.worker.gpusPerPod)) -}}
{{- end -}}

{{/*
The run config as rendered into the ConfigMap: values.config plus what the chart owns (the exporter's port
and bind address) and what follows from the worker group unless given. Refuses anything that looks like a
credential: those come only from the Secret named in s3.existingSecret.
*/}}
{{- define "pggan.config" -}}
{{- $cfg := deepCopy (default dict .Values.config) -}}
{{- $storage := default dict (get $cfg "storage") -}}
{{- range $k, $v := (default dict (get $storage "options")) -}}
{{- if regexMatch "(?i)(secret|password|passwd|token|credential|^key$|access_key|session)" $k -}}
{{- fail (printf "config.storage.options.%s: credentials must not be in values; put them in the Secret named by s3.existingSecret" $k) -}}
{{- end -}}
{{- end -}}
{{- if regexMatch "[a-zA-Z0-9+.-]+://[^/@\\s]*:[^/@\\s]*@" (toYaml $cfg) -}}
{{- fail "config: a URL with user:password@ was given; credentials must come from the Secret named by s3.existingSecret" -}}
{{- end -}}
{{- $metrics := default dict (get $cfg "metrics") -}}
{{- $_ := set $metrics "port" (int .Values.metrics.port) -}}
{{- $_ := set $metrics "host" "0.0.0.0" -}}
{{- /* The exporter outlives the run by at least 2.5 scrape intervals, so the end state is scraped. */ -}}
{{- if not (hasKey $metrics "linger_s") -}}
{{- $iv := .Values.metrics.serviceMonitor.interval | toString -}}
{{- $ivs := 30 -}}
{{- if regexMatch "^[0-9]+s$" $iv }}{{ $ivs = trimSuffix "s" $iv | int }}{{ end -}}
{{- if regexMatch "^[0-9]+m$" $iv }}{{ $ivs = mul (trimSuffix "m" $iv | int) 60 }}{{ end -}}
{{- $_ := set $metrics "linger_s" (max 75 (div (mul $ivs 5) 2)) -}}
{{- end -}}
{{- $_ := set $cfg "metrics" $metrics -}}
{{- $cluster := default dict (get $cfg "cluster") -}}
{{- if not (hasKey $cluster "num_workers") -}}
{{- $_ := set $cluster "num_workers" (int (include "pggan.numWorkers" .)) -}}
{{- end -}}
{{- if not (hasKey $cluster "use_gpu") -}}
{{- $_ := set $cluster "use_gpu" (gt (int .Values.worker.gpusPerPod) 0) -}}
{{- end -}}
{{- if gt (int $cluster.num_workers) (int (include "pggan.numWorkers" .)) -}}
{{- fail (printf "config.cluster.num_workers (%v) is more than the worker group holds (%s): the run would wait for resources forever" $cluster.num_workers (include "pggan.numWorkers" .)) -}}
{{- end -}}
{{- $_ := set $cfg "cluster" $cluster -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Environment shared by head and workers: storage credentials by reference only, plus extraEnv. */}}
{{- define "pggan.env" -}}
{{- with .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.secretAccessKeyKey }}
{{- with $.Values.s3.sessionTokenKey }}
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.s3.existingSecret }}
      key: {{ . }}
{{- end }}
{{- end }}
{{- with .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if and (hasKey . "value") (regexMatch "(?i)(secret|password|passwd|token|credential|access_key|session)" .name) }}
{{- fail (printf "extraEnv %s: give secrets as valueFrom.secretKeyRef, not as a value" .name) }}
{{- end }}
- {{ toYaml . | nindent 2 | trim }}
{{- end }}
{{- end -}}

{{/* Prometheus Operator objects render only where the cluster serves their API (their CRDs are installed). */}}
{{- define "pggan.monitoringApi" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- end -}}

{{/* Labels of a Prometheus Operator object: the chart's, `release` for kube-prometheus-stack's default
selectors, then the object's own (given as the argument's "labels"). */}}
{{- define "pggan.monitoringLabels" -}}
{{- include "pggan.labels" .ctx }}
{{- $extra := dict -}}
{{- with .ctx.Values.metrics.prometheusRelease }}{{ $_ := set $extra "release" . }}{{ end -}}
{{- $extra = merge (deepCopy (default dict .labels)) $extra -}}
{{- with $extra }}
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{/* Ray's metrics export port of a group (its rayStartParams' metrics-export-port; KubeRay's default 8080). */}}
{{- define "pggan.rayMetricsPort" -}}
{{- int (get (default dict .) "metrics-export-port" | default 8080) -}}
{{- end -}}

{{/* Head-only environment: where the Ray dashboard finds Prometheus and Grafana. */}}
{{- define "pggan.headEnv" -}}
{{- $d := .Values.ray.dashboard -}}
{{- range $name, $key := dict "RAY_PROMETHEUS_HOST" "prometheusHost" "RAY_PROMETHEUS_NAME" "prometheusName" "RAY_GRAFANA_HOST" "grafanaHost" "RAY_GRAFANA_IFRAME_HOST" "grafanaIframeHost" }}
{{- with get $d $key }}
- name: {{ $name }}
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}
