{{/* Names and labels shared by every manifest of the chart. */}}

{{- define "everlearn.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's base name; also the RayCluster's name (<= 40 characters: KubeRay derives pod and service names from it). */}}
{{- define "everlearn.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "everlearn.selectorLabels" -}}
app.kubernetes.io/name: {{ include "everlearn.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "everlearn.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "everlearn.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: everlearn
{{- end -}}

{{- define "everlearn.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "everlearn.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "everlearn.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Where the run's volume is mounted, and the checkpoint URL every pod uses. */}}
{{- define "everlearn.dataDir" -}}/var/lib/everlearn{{- end -}}

{{- define "everlearn.checkpointUrl" -}}
{{- .Values.checkpoints.url | default (printf "%s/run/checkpoints" (include "everlearn.dataDir" .)) -}}
{{- end -}}

{{/* Pods mount the run's volume when checkpoints live on it. */}}
{{- define "everlearn.checkpointsOnVolume" -}}
{{- if and .Values.persistence.enabled (not .Values.checkpoints.url) -}}true{{- end -}}
{{- end -}}

{{- define "everlearn.claimName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-data" (include "everlearn.fullname" .)) -}}
{{- end -}}

{{/* The restricted Pod Security Standard, pod level. */}}
{{- define "everlearn.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The restricted Pod Security Standard, container level. */}}
{{- define "everlearn.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Environment every everlearn process needs: a writable HOME and caches on the /tmp volume, S3 credentials by reference. */}}
{{- define "everlearn.commonEnv" -}}
- name: HOME
  value: /tmp
- name: HF_HOME
  value: /tmp/huggingface
- name: TRITON_CACHE_DIR
  value: /tmp/triton
- name: PYTHONUNBUFFERED
  value: "1"
{{- with .Values.secrets.s3.name }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.secrets.s3.accessKeyIdKey | quote }}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.secrets.s3.secretAccessKeyKey | quote }}}
{{- end }}
{{- with .Values.checkpoints.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.checkpoints.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Volumes of every Ray pod: /tmp (Ray's sessions, HOME, caches: the root filesystem is read-only) and the run's volume. */}}
{{- define "everlearn.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if include "everlearn.checkpointsOnVolume" . }}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "everlearn.claimName" . }}
{{- end }}
{{- end -}}

{{- define "everlearn.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if include "everlearn.checkpointsOnVolume" . }}
- name: data
  mountPath: {{ include "everlearn.dataDir" . }}
{{- end }}
{{- end -}}

{{/* The everlearn configuration the daemon runs: the user's, with what the chart wires on top. */}}
{{- define "everlearn.config" -}}
{{- $user := .Values.config | default dict -}}
{{- range $path := list "run_dir" "ray.address" "metrics.host" "metrics.port" "serve.host" "serve.port" "serve.route_prefix" "checkpoint.url" -}}
{{- $parts := splitList "." $path -}}
{{- $node := $user -}}
{{- range $i, $p := $parts -}}
{{- if and (kindIs "map" $node) (hasKey $node $p) -}}
{{- $node = get $node $p -}}
{{- if eq (add1 $i) (len $parts) -}}
{{- fail (printf "config.%s is set by the chart; remove it (ports: daemon.metricsPort and serving.port, the route: serving.routePrefix, checkpoints: checkpoints.url, ray.address: the daemon joins its head's Ray)" $path) -}}
{{- end -}}
{{- else -}}
{{- $node = "" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $wired := dict
  "run_dir" (printf "%s/run" (include "everlearn.dataDir" .))
  "ray" (dict "address" "auto")
  "metrics" (dict "host" "0.0.0.0" "port" (int .Values.daemon.metricsPort))
  "checkpoint" (dict "url" (include "everlearn.checkpointUrl" .))
  "serve" (dict "host" "0.0.0.0" "port" (int .Values.serving.port) "route_prefix" .Values.serving.routePrefix "resources" (dict "everlearn_cpu" 1))
  "gate" (dict "evaluator_resources" (dict "everlearn_cpu" 1))
  "train" (dict "resources" (dict (ternary "everlearn_gpu" "everlearn_cpu" .Values.workers.gpu.enabled) 1))
-}}
{{- if .Values.workers.gpu.enabled -}}
{{- $_ := set $wired.train "num_gpus" (int .Values.workers.gpu.gpusPerWorker) -}}
{{- end -}}
{{- if .Values.secrets.kafkaSaslPassword.name -}}
{{- $_ := set $wired "source" (dict "kafka" (dict "sasl_password_env" "EVERLEARN_KAFKA_SASL_PASSWORD")) -}}
{{- end -}}
{{- $config := mustMergeOverwrite (deepCopy .Values.config) $wired -}}
{{- $found := regexFind "\"(key|secret|password|token|session_token|aws_access_key_id|aws_secret_access_key|sasl_plain_password)\":\"[^\"]" (toJson $config) -}}
{{- if $found -}}
{{- fail (printf "config holds a credential (%s...): it would land in a ConfigMap. Reference an existing Secret instead: secrets.s3 (S3 keys, read from the environment), secrets.kafkaSaslPassword, secrets.adminToken" (regexFind "\"[a-z_]+\"" $found)) -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}
