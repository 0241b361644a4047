{{/* vim: set filetype=mustache: */}}
{{/*
Names, labels and small shared fragments. One template file per rendered object; everything they share
lives here (and the Serve config in _serve-config.tpl, the pod templates in _pod-template.tpl).
*/}}

{{/* Chart name, overridable. */}}
{{- define "instantid.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified name used as the prefix of every object. Kept at 40 characters at most: KubeRay derives
RayCluster, Service and pod names from the RayService name and appends suffixes of its own.
*/}}
{{- define "instantid.fullname" -}}
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

{{/* "name-version" for the helm.sh/chart label. */}}
{{- define "instantid.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object the chart renders. */}}
{{- define "instantid.labels" -}}
helm.sh/chart: {{ include "instantid.chart" . }}
{{ include "instantid.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: instantid-serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels that identify the release's own objects. */}}
{{- define "instantid.selectorLabels" -}}
app.kubernetes.io/name: {{ include "instantid.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
Labels of the Ray pods. No app.kubernetes.io/name here: KubeRay sets it to "kuberay" on the pods it creates
and a template value would override it. The labels survive KubeRay's blue/green cluster switch, so the
PodMonitor, the metrics Service and the PodDisruptionBudget select with them (plus ray.io/is-ray-node).
*/}}
{{- define "instantid.podLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: instantid-serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector of all Ray pods of this release (any RayCluster generation). */}}
{{- define "instantid.rayPodSelector" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: instantid-serve
ray.io/is-ray-node: "yes"
{{- end -}}

{{/* Object names. The workers' ServiceAccount (no API token mounted) and the head's (KubeRay binds the
autoscaler's pod-patching Role to it). */}}
{{- define "instantid.headServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-head" (include "instantid.fullname" .)) .Values.serviceAccount.headName -}}
{{- else -}}
{{- default (include "instantid.serviceAccountName" .) .Values.serviceAccount.headName -}}
{{- end -}}
{{- end -}}

{{- define "instantid.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "instantid.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "instantid.serveServiceName" -}}
{{- printf "%s-serve" (include "instantid.fullname" .) -}}
{{- end -}}

{{- define "instantid.metricsServiceName" -}}
{{- printf "%s-metrics" (include "instantid.fullname" .) -}}
{{- end -}}

{{- define "instantid.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "instantid.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{- define "instantid.hfSecretName" -}}
{{- default (printf "%s-hf-token" (include "instantid.fullname" .)) .Values.huggingface.existingSecret -}}
{{- end -}}

{{- define "instantid.awsSecretName" -}}
{{- default (printf "%s-aws" (include "instantid.fullname" .)) .Values.aws.existingSecret -}}
{{- end -}}

{{- define "instantid.modelCacheClaimName" -}}
{{- default (printf "%s-model-cache" (include "instantid.fullname" .)) .Values.modelCache.persistence.existingClaim -}}
{{- end -}}

{{/* Image reference; the tag defaults to the chart's appVersion. */}}
{{- define "instantid.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}

{{/*
Metrics ports of the Ray pods, one place for the pods, the PodMonitor, the metrics Service and the ServiceMonitor:
{"name": port}. "metrics": the app's instantid_*, Serve's ray_serve_* and Ray's own (every pod); "as-metrics"
and "dash-metrics": the autoscaler and the dashboard (head only); "haproxy-metrics": Ray's HAProxy ingress
exporter (every pod, with serve.httpIngress haproxy; RAY_SERVE_HAPROXY_METRICS_PORT's default).
*/}}
{{- define "instantid.metricsPorts" -}}
{{- $ports := dict "metrics" 8080 "as-metrics" 44217 "dash-metrics" 44227 -}}
{{- if eq .Values.serve.httpIngress "haproxy" -}}
{{- $_ := set $ports "haproxy-metrics" 9101 -}}
{{- end -}}
{{- toJson $ports -}}
{{- end -}}

{{/* Switches derived from values. */}}
{{- define "instantid.hfTokenEnabled" -}}
{{- if or .Values.huggingface.existingSecret .Values.huggingface.token -}}true{{- end -}}
{{- end -}}

{{- define "instantid.awsCredentialsEnabled" -}}
{{- if .Values.aws.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* The Secret holding the jobs Redis URL (an existing one, or the trial Redis's); empty: none. */}}
{{- define "instantid.jobsRedisSecret" -}}
{{- if .Values.jobs.enabled -}}
{{- if .Values.jobs.trialRedis.enabled -}}{{ printf "%s-jobs-redis" (include "instantid.fullname" .) }}
{{- else -}}{{ .Values.jobs.redis.existingSecret }}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "instantid.jobsRedisSecretKey" -}}
{{- ternary "url" .Values.jobs.redis.existingSecretKey .Values.jobs.trialRedis.enabled -}}
{{- end -}}

{{/* Most Ingress replicas the config allows. */}}
{{- define "instantid.ingressMaxReplicas" -}}
{{- $i := .Values.serve.deployments.Ingress -}}
{{- if $i.autoscaling_config -}}{{ int $i.autoscaling_config.max_replicas }}{{- else -}}{{ int ($i.num_replicas | default 1) }}{{- end -}}
{{- end -}}

{{/* Custom Ray resource of the CPU face group: name and one-replica request. */}}
{{- define "instantid.cpuPoolResource" -}}
{{- .Values.faceWorker.customResource.name -}}
{{- end -}}

{{/*
GPU placement. GPU memory per card in MiB, as NVIDIA's GPU feature discovery labels it (nvidia.com/gpu.memory);
GKE labels only the accelerator's name, so its names are listed here with their memory.
*/}}
{{- define "instantid.gkeAccelerators" -}}
{"nvidia-tesla-p4": 7680, "nvidia-tesla-t4": 15360, "nvidia-tesla-p100": 16384, "nvidia-tesla-v100": 16384, "nvidia-l4": 23034, "nvidia-tesla-a100": 40960, "nvidia-a100-80gb": 81920, "nvidia-h100-80gb": 81559, "nvidia-h100-mega-80gb": 81559, "nvidia-h200-141gb": 143771}
{{- end -}}

{{/* Least GPU memory (MiB) a Generator replica needs: SDXL in float16 ~12 GiB, ~7 GiB more per extra model kept
loaded (app.max_models_per_replica): a 16 GB card for one, 24 GB for two, 48 GB beyond. */}}
{{- define "instantid.gpuMinMiB" -}}
{{- $v := .Values.generatorWorker.gpu.minMemoryMiB -}}
{{- if not (kindIs "invalid" $v) -}}{{ int $v }}
{{- else if le (int .Values.app.max_models_per_replica) 1 -}}15000
{{- else if eq (int .Values.app.max_models_per_replica) 2 -}}22000
{{- else -}}40000
{{- end -}}
{{- end -}}

{{/* matchExpressions (JSON list) that admit only GPUs of at least instantid.gpuMinMiB, in the labels of
generatorWorker.gpu.nodeLabels; [] for "none". */}}
{{- define "instantid.gpuPinExpressions" -}}
{{- $min := int (include "instantid.gpuMinMiB" .) -}}
{{- $labels := .Values.generatorWorker.gpu.nodeLabels -}}
{{- $out := list -}}
{{- if eq $labels "gke" -}}
{{- $names := list -}}
{{- range $name, $mib := include "instantid.gkeAccelerators" . | fromJson -}}
{{- if ge (int $mib) $min -}}{{- $names = append $names $name -}}{{- end -}}
{{- end -}}
{{- $out = append $out (dict "key" "cloud.google.com/gke-accelerator" "operator" "In" "values" (sortAlpha $names)) -}}
{{- else if eq $labels "karpenter" -}}
{{- /* Karpenter's label is EC2's figure (MiB), a little below NVIDIA's for some cards: 5% slack */ -}}
{{- $out = append $out (dict "key" "karpenter.k8s.aws/instance-gpu-memory" "operator" "Gt" "values" (list (toString (sub (div (mul $min 95) 100) 1)))) -}}
{{- else if eq $labels "gfd" -}}
{{- $out = append $out (dict "key" "nvidia.com/gpu.memory" "operator" "Gt" "values" (list (toString (sub $min 1)))) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* matchExpressions (JSON list) that refuse every GPU node, whatever labels the cluster uses (none of them is on
a CPU node): the head (do-not-disrupt) and the face pods would otherwise hold a GPU node that never scales down. */}}
{{- define "instantid.offGpuExpressions" -}}
{{- $keys := list "cloud.google.com/gke-accelerator" "karpenter.k8s.aws/instance-gpu-count" "nvidia.com/gpu.present" "nvidia.com/gpu.count" -}}
{{- $out := list -}}
{{- range $keys -}}{{- $out = append $out (dict "key" . "operator" "DoesNotExist") -}}{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* An affinity with a required node affinity of `expressions` added, unless the user's already has a node
affinity (theirs wins). Call with dict "affinity" <map> "expressions" <list>; returns JSON. */}}
{{- define "instantid.withNodeAffinity" -}}
{{- $aff := deepCopy (.affinity | default dict) -}}
{{- if and .expressions (not (hasKey $aff "nodeAffinity")) -}}
{{- $_ := set $aff "nodeAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (dict "nodeSelectorTerms" (list (dict "matchExpressions" .expressions)))) -}}
{{- end -}}
{{- toJson $aff -}}
{{- end -}}

{{/* A Kubernetes quantity (1Ti, 200Gi, 500M, bytes) in GiB, as a float. */}}
{{- define "instantid.gib" -}}
{{- $q := toString . -}}
{{- $units := dict "Ki" 0.0000009536743164 "Mi" 0.0009765625 "Gi" 1.0 "Ti" 1024.0 "Pi" 1048576.0 "k" 0.000000931322574615 "M" 0.000931322574615 "G" 0.931322574615 "T" 931.322574615 -}}
{{- $out := "" -}}
{{- range $suffix := list "Ki" "Mi" "Gi" "Ti" "Pi" "k" "M" "G" "T" -}}
{{- if and (not $out) (hasSuffix $suffix $q) -}}
{{- $out = toString (mulf (float64 (trimSuffix $suffix $q)) (index $units $suffix)) -}}
{{- end -}}
{{- end -}}
{{- default (toString (divf (float64 $q) 1073741824.0)) $out -}}
{{- end -}}

{{/*
Secrets a component reads, as files (a mounted Secret is updated in place when it changes, so the app picks up a
rotation without a restart; an env var is fixed for the life of the process). Only where used: API-key hashes
on the face group (the Ingress replicas), the Hugging Face token where weights are downloaded (face, generator,
the warm-up). Call with: dict "root" $ "component" <head|face|generator|warmup>; returns a JSON list of
{volume, secret, key, dir, file, env}: env names the variable that carries the file's path.
*/}}
{{- define "instantid.secretFiles" -}}
{{- $root := .root -}}
{{- $files := list -}}
{{- if and (eq .component "face") $root.Values.app.auth.enabled -}}
{{- $files = append $files (dict "volume" "api-keys" "secret" (include "instantid.apiKeysSecretName" $root) "key" $root.Values.apiKeys.existingSecretKey "dir" "/etc/instantid/api-keys" "file" "hashes" "env" "INSTANTID_API_KEY_HASHES_FILE") -}}
{{- end -}}
{{- if and (has .component (list "face" "generator" "warmup")) (include "instantid.hfTokenEnabled" $root) -}}
{{- $files = append $files (dict "volume" "hf-token" "secret" (include "instantid.hfSecretName" $root) "key" $root.Values.huggingface.existingSecretKey "dir" "/etc/instantid/hf" "file" "token" "env" "HF_TOKEN_PATH") -}}
{{- end -}}
{{- toJson $files -}}
{{- end -}}

{{/*
Environment of a Ray container (or the warm-up): the Serve HTTP ingress, model cache locations, hub/S3
settings, the paths of its secret files and, where weights are read from S3 (face, generator, warm-up), static
S3 credentials if configured (prefer IRSA/workload identity: nothing to leak or rotate).
Call with: dict "root" $ "component" <head|face|generator|warmup>.
*/}}
{{- define "instantid.env" -}}
{{- $root := .root -}}
{{- $mount := trimSuffix "/" $root.Values.modelCache.mountPath -}}
- name: HF_HOME
  value: {{ printf "%s/huggingface" $mount | quote }}
- name: INSTANTID_CACHE
  value: {{ printf "%s/instantid" $mount | quote }}
- name: INSIGHTFACE_HOME
  value: {{ printf "%s/insightface" $mount | quote }}
- name: HF_HUB_DISABLE_TELEMETRY
  value: "1"
{{- if eq $root.Values.serve.httpIngress "haproxy" }}
{{- /* the same as deployments.ray_env.CLUSTER_ENV (a test keeps them equal) */}}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
- name: RAY_SERVE_HAPROXY_BINARY_PATH
  value: "/home/ray/app/instantid-haproxy"
{{- if ne .component "warmup" }}
{{- /* a reload (every Ingress replica change) must not cut a request still within its deadline */}}
- name: RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S
  value: {{ include "instantid.hardStopAfterS" $root | quote }}
{{- end }}
{{- end }}
{{- if eq .component "warmup" }}
- name: INSTANTID_WARMUP_CONFIG
  value: {{ include "instantid.warmupConfig" $root | quote }}
{{- end }}
{{- if and $root.Values.huggingface.offline (ne .component "warmup") }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- range $f := include "instantid.secretFiles" . | fromJsonArray }}
- name: {{ $f.env }}
  value: {{ printf "%s/%s" $f.dir $f.file | quote }}
{{- end }}
{{- $policy := (($root.Values.serve.deployments.Generator.autoscaling_config | default dict).policy) }}
{{- if or (eq .component "face") (and (eq .component "head") $policy) }}
{{- /* the Ingress runs on the face pods: it talks to the jobs store (and alone signs webhooks); Serve's controller
on the head runs a Generator autoscaling policy, which reads the job backlog from the same store */}}
{{- with include "instantid.jobsRedisSecret" $root }}
- name: {{ $root.Values.app.jobs.redis_url_env }}
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "instantid.jobsRedisSecretKey" $root }}
{{- end }}
{{- with (eq .component "face" | ternary $root.Values.jobs.webhookSecret.existingSecret "") }}
- name: {{ $root.Values.app.jobs.webhooks.secret_env }}
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.jobs.webhookSecret.existingSecretKey }}
{{- end }}
{{- end }}
{{- with $root.Values.aws.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with $root.Values.aws.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- if and (has .component (list "face" "generator" "warmup")) (include "instantid.awsCredentialsEnabled" $root) }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "instantid.awsSecretName" $root }}
      key: {{ $root.Values.aws.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "instantid.awsSecretName" $root }}
      key: {{ $root.Values.aws.secretAccessKeyKey }}
{{- end }}
{{- with $root.Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
HAProxy's hard-stop-after in seconds: serve.haproxy.hardStopAfterS, or the longest request (app.request_timeout_s)
plus the margin an answer (or the 504) needs to be written. "instantid.hardStopFloor" is the least the chart accepts.
*/}}
{{- define "instantid.hardStopFloor" -}}
{{- add (int (ceil (float64 .Values.app.request_timeout_s))) 30 -}}
{{- end -}}

{{- define "instantid.hardStopAfterS" -}}
{{- $v := (.Values.serve.haproxy | default dict).hardStopAfterS -}}
{{- if kindIs "invalid" $v -}}{{ include "instantid.hardStopFloor" . }}{{- else -}}{{ int $v }}{{- end -}}
{{- end -}}

{{/*
Render-time checks that a JSON schema cannot express (relations between values).
*/}}
{{- define "instantid.validate" -}}
{{- $gen := .Values.serve.deployments.Generator -}}
{{- $genGpus := default 0 $gen.ray_actor_options.num_gpus | float64 -}}
{{- $gw := .Values.generatorWorker -}}
{{- if gt $genGpus (float64 $gw.gpusPerPod) -}}
{{- fail (printf "serve.deployments.Generator.ray_actor_options.num_gpus (%v) is more than generatorWorker.gpusPerPod (%v): no GPU pod could host a replica" $gen.ray_actor_options.num_gpus $gw.gpusPerPod) -}}
{{- end -}}
{{- /* nothing in flight is cut: a draining replica and a replaced cluster outlive the longest request */ -}}
{{- $timeout := float64 .Values.app.request_timeout_s -}}
{{- range $name := list "Ingress" "Generator" -}}
{{- $grace := default 0 (index $.Values.serve.deployments $name).graceful_shutdown_timeout_s | float64 -}}
{{- if lt $grace $timeout -}}
{{- fail (printf "serve.deployments.%s.graceful_shutdown_timeout_s (%v) is less than app.request_timeout_s (%v): a replica that stops would cut requests still within their deadline" $name $grace $timeout) -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.serve.httpIngress "haproxy") (lt (int (include "instantid.hardStopAfterS" .)) (int (include "instantid.hardStopFloor" .))) -}}
{{- fail (printf "serve.haproxy.hardStopAfterS (%v) is less than app.request_timeout_s (%v) + 30 s: Ray reloads HAProxy on every Ingress replica change and the old worker would cut requests still within their deadline" (include "instantid.hardStopAfterS" .) .Values.app.request_timeout_s) -}}
{{- end -}}
{{- if and (eq .Values.rayService.upgradeStrategy.type "NewCluster") (lt (float64 .Values.rayService.rayClusterDeletionDelaySeconds) $timeout) -}}
{{- fail (printf "rayService.rayClusterDeletionDelaySeconds (%v) is less than app.request_timeout_s (%v): an upgrade would delete the old cluster under requests still within their deadline" .Values.rayService.rayClusterDeletionDelaySeconds $timeout) -}}
{{- end -}}
{{- if gt $genGpus 0.0 -}}
{{- $perPod := floor (divf (float64 $gw.gpusPerPod) $genGpus) -}}
{{- if gt (float64 $gen.autoscaling_config.max_replicas) (mulf $perPod (float64 $gw.maxReplicas)) -}}
{{- fail (printf "serve.deployments.Generator.autoscaling_config.max_replicas (%v) needs more GPU pods than generatorWorker.maxReplicas (%v) with %v replica(s) per pod" $gen.autoscaling_config.max_replicas $gw.maxReplicas $perPod) -}}
{{- end -}}
{{- end -}}
{{- range $name, $group := dict "faceWorker" .Values.faceWorker "generatorWorker" .Values.generatorWorker -}}
{{- if gt (int $group.minReplicas) (int $group.maxReplicas) -}}
{{- fail (printf "%s.minReplicas (%v) is greater than %s.maxReplicas (%v)" $name $group.minReplicas $name $group.maxReplicas) -}}
{{- end -}}
{{- if or (lt (int $group.replicas) (int $group.minReplicas)) (gt (int $group.replicas) (int $group.maxReplicas)) -}}
{{- fail (printf "%s.replicas (%v) must lie between minReplicas (%v) and maxReplicas (%v)" $name $group.replicas $group.minReplicas $group.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- range $name, $dep := .Values.serve.deployments -}}
{{- with $dep.autoscaling_config -}}
{{- if gt (int .min_replicas) (int .max_replicas) -}}
{{- fail (printf "serve.deployments.%s.autoscaling_config.min_replicas (%v) is greater than max_replicas (%v)" $name .min_replicas .max_replicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.monitoring.podMonitor.enabled .Values.monitoring.serviceMonitor.enabled -}}
{{- fail "monitoring.podMonitor.enabled and monitoring.serviceMonitor.enabled scrape the same pods twice: enable one" -}}
{{- end -}}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) -}}
{{- fail "serviceAccount.name is required when serviceAccount.create is false (the autoscaler is bound to the head pod's ServiceAccount)" -}}
{{- end -}}
{{- $store := toString .Values.app.identity_store -}}
{{- if not (hasPrefix "s3://" $store) -}}
{{- $mount := printf "%s/" (trimSuffix "/" .Values.modelCache.mountPath) -}}
{{- if or (not .Values.modelCache.persistence.enabled) (not (hasPrefix $mount $store)) -}}
{{- fail (printf "app.identity_store %q is not shared by the replicas: use s3://bucket/prefix, or a path under modelCache.mountPath (%s) with modelCache.persistence.enabled" $store .Values.modelCache.mountPath) -}}
{{- end -}}
{{- end -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" (include "instantid.fullname" .)) -}}
{{- fail (printf "the object prefix %q must be a DNS-1035 label (start with a letter): KubeRay requires it of the RayService name; set fullnameOverride" (include "instantid.fullname" .)) -}}
{{- end -}}
{{- /* KubeRay operator rules (validation.go, v1.7) that values can break: the API server would accept the
RayService and the operator would then refuse to reconcile it, saying so only in an event */ -}}
{{- $autoscalerV2 := and .Values.autoscaler.enabled (eq (toString .Values.autoscaler.version) "v2") -}}
{{- range $key := list "faceWorker" "generatorWorker" -}}
{{- $group := index $.Values $key -}}
{{- if and (not (kindIs "invalid" $group.idleTimeoutSeconds)) (not $autoscalerV2) -}}
{{- fail (printf "%s.idleTimeoutSeconds needs autoscaler v2 (KubeRay refuses a worker group idle timeout otherwise): set autoscaler.enabled true and autoscaler.version v2, or leave it null to use autoscaler.idleTimeoutSeconds" $key) -}}
{{- end -}}
{{- end -}}
{{- range $key := list "head" "faceWorker" "generatorWorker" -}}
{{- $params := (index $.Values $key).rayStartParams | default dict -}}
{{- if hasKey $params "labels" -}}
{{- fail (printf "%s.rayStartParams.labels is refused by KubeRay: use %s.labels" $key $key) -}}
{{- end -}}
{{- end -}}
{{- range $param := list "redis-username" "redis-password" -}}
{{- if hasKey ($.Values.head.rayStartParams | default dict) $param -}}
{{- fail (printf "head.rayStartParams.%s is refused by KubeRay: external Redis is configured with gcsFaultTolerance.*" $param) -}}
{{- end -}}
{{- end -}}
{{- $envs := concat (.Values.env | default list) (.Values.head.env | default list) (.Values.faceWorker.env | default list) (.Values.generatorWorker.env | default list) -}}
{{- range $entry := $envs -}}
{{- if has $entry.name (list "RAY_enable_autoscaler_v2" "RAY_REDIS_ADDRESS" "REDIS_PASSWORD" "REDIS_USERNAME") -}}
{{- fail (printf "env %s is refused (KubeRay manages it): use autoscaler.version for autoscaler v2 and gcsFaultTolerance.* for external Redis" $entry.name) -}}
{{- end -}}
{{- end -}}
{{- range $entry := .Values.autoscaler.env | default list -}}
{{- if eq $entry.name "KUBERAY_GEN_AUTOSCALER_START_CMD" -}}
{{- fail "autoscaler.env must not set KUBERAY_GEN_AUTOSCALER_START_CMD (KubeRay injects it)" -}}
{{- end -}}
{{- end -}}
{{- with index (.Values.rayService.annotations | default dict) "ray.io/initializing-timeout" -}}
{{- if not (and (regexMatch "^([0-9]+|([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+)$" (toString .)) (regexMatch "[1-9]" (toString .))) -}}
{{- fail (printf "rayService.annotations ray.io/initializing-timeout %q must be a positive Go duration (30m) or whole seconds" (toString .)) -}}
{{- end -}}
{{- end -}}
{{- if and (ne .Values.serve.proxyLocation "EveryNode") .Values.rayService.excludeHeadPodFromServeSvc -}}
{{- fail (printf "serve.proxyLocation %s puts no proxy on the workers, so rayService.excludeHeadPodFromServeSvc must be false" .Values.serve.proxyLocation) -}}
{{- end -}}
{{- range $name, $dep := .Values.serve.deployments -}}
{{- with $dep.ray_actor_options.accelerator_type -}}
{{- fail (printf "serve.deployments.%s.ray_actor_options.accelerator_type (%s) would ask Ray for an accelerator_type resource that KubeRay's autoscaler does not advertise for a worker group, so replicas beyond the first pod would never be scheduled: pin the GPU type with generatorWorker.nodeSelector (e.g. cloud.google.com/gke-accelerator: nvidia-l4 or karpenter.k8s.aws/instance-gpu-name: l4) instead" $name .) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.modelCache.warmup.enabled (not .Values.modelCache.persistence.enabled) -}}
{{- fail "modelCache.warmup.enabled needs modelCache.persistence.enabled: the warm-up fills the shared cache, and per-pod caches share nothing" -}}
{{- end -}}
{{- /* offline replicas load only what is cached or on S3: a hub reference that no warm-up fetched fails the first
request that needs it (the safety checker: every generate) while the RayService looks Ready */ -}}
{{- if and .Values.huggingface.offline (not .Values.modelCache.warmup.enabled) -}}
{{- with include "instantid.hubRefs" . | fromJsonArray -}}
{{- $first := first . -}}
{{- fail (printf "%s (%s) is a Hugging Face hub reference, and with huggingface.offline nothing fetches it: enable modelCache.warmup (it runs `instantid download` for every model the app names), give an s3:// or a path on the model cache, or turn huggingface.offline off" $first.field $first.ref) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.gcsFaultTolerance.enabled (not .Values.gcsFaultTolerance.redisAddress) -}}
{{- fail "gcsFaultTolerance.enabled needs gcsFaultTolerance.redisAddress (host:port of a highly available Redis)" -}}
{{- end -}}
{{- if .Values.podDisruptionBudget.enabled -}}
{{- range $component, $key := dict "face" "faceWorker" "generator" "generatorWorker" -}}
{{- $min := (index $.Values.podDisruptionBudget $component).minAvailable -}}
{{- $pods := (index $.Values $key).minReplicas -}}
{{- if and (not (kindIs "invalid" $min)) (ge (int $min) (int $pods)) -}}
{{- fail (printf "podDisruptionBudget.%s.minAvailable (%v) must be less than %s.minReplicas (%v): at the group's minimum size no pod could ever be evicted and node drains would hang" $component $min $key $pods) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* secrets come from existing Secrets: values end up in Helm's release Secret and in `helm get values` */ -}}
{{- if or .Values.aws.accessKeyId .Values.aws.secretAccessKey -}}
{{- fail "aws.accessKeyId/aws.secretAccessKey are refused (Helm keeps values in its release Secret, readable with `helm get values`): create a Secret and set aws.existingSecret, or use IRSA/workload identity (serviceAccount.annotations)" -}}
{{- end -}}
{{- with .Values.app.jobs.redis_url -}}
{{- if contains "@" (toString .) -}}
{{- fail "app.jobs.redis_url holds credentials and would be readable in the RayService's serve config: put the URL in a Secret and set jobs.redis.existingSecret" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.jobs.trialRedis.enabled .Values.jobs.redis.existingSecret -}}
{{- fail "jobs.trialRedis.enabled and jobs.redis.existingSecret both name the jobs store: choose one" -}}
{{- end -}}
{{- /* the scheduler reserves what a pod requests: the emptyDirs it writes must fit in its ephemeral-storage
request, or the kubelet evicts it for disk pressure once they fill */ -}}
{{- range $key := list "head" "faceWorker" "generatorWorker" -}}
{{- $g := index $.Values $key -}}
{{- $req := (($g.resources | default dict).requests | default dict) -}}
{{- $need := float64 (include "instantid.gib" $g.rayTmpSize) -}}
{{- $what := printf "%s.rayTmpSize (%s)" $key $g.rayTmpSize -}}
{{- if and (eq $key "generatorWorker") (not $.Values.modelCache.persistence.enabled) -}}
{{- $need = addf $need (float64 (include "instantid.gib" $.Values.modelCache.emptyDirSizeLimit)) -}}
{{- $what = printf "%s + modelCache.emptyDirSizeLimit (%s, the per-pod model cache)" $what $.Values.modelCache.emptyDirSizeLimit -}}
{{- end -}}
{{- $have := 0.0 -}}
{{- if hasKey $req "ephemeral-storage" -}}{{- $have = float64 (include "instantid.gib" (index $req "ephemeral-storage")) -}}{{- end -}}
{{- if lt $have $need -}}
{{- fail (printf "%s.resources.requests.ephemeral-storage (%v) is less than %s: the pod would be placed on a node without the disk it writes and evicted when it fills" $key (index $req "ephemeral-storage" | default "unset") $what) -}}
{{- end -}}
{{- end -}}
{{- /* Filestore (GKE's ReadWriteMany classes) provisions at least 1 TiB (2.5 TiB for premium): a smaller claim
stays Pending with a provisioning error */ -}}
{{- $filestoreMin := dict "standard-rwx" 1024 "enterprise-rwx" 1024 "zonal-rwx" 1024 "premium-rwx" 2560 -}}
{{- $pv := .Values.modelCache.persistence -}}
{{- if and $pv.enabled (not $pv.existingClaim) (hasKey $filestoreMin (toString $pv.storageClassName)) -}}
{{- $min := index $filestoreMin $pv.storageClassName -}}
{{- if lt (float64 (include "instantid.gib" $pv.size)) (float64 $min) -}}
{{- fail (printf "modelCache.persistence.size (%s) is below Filestore's minimum for %s (%vGi): the claim would stay Pending; set at least %vGi (docs/deploy.md 1.5)" $pv.size $pv.storageClassName $min $min) -}}
{{- end -}}
{{- end -}}
{{- /* a new ReadWriteMany claim on the cluster's default class (EBS, PD: no RWX) stays Pending, and every Ray pod with it */ -}}
{{- $p := .Values.modelCache.persistence -}}
{{- if and $p.enabled (not $p.existingClaim) (has "ReadWriteMany" $p.accessModes) (not $p.storageClassName) -}}
{{- fail "modelCache.persistence.storageClassName is empty: the cluster's default class (EBS on EKS, Persistent Disk on GKE) cannot do ReadWriteMany, so the model cache would stay Pending and every Ray pod with it. Set a ReadWriteMany class (EKS: an EFS class such as efs-sc; GKE: Filestore standard-rwx; AKS: azurefile-csi), or modelCache.persistence.existingClaim, or modelCache.persistence.enabled=false with an s3:// app.identity_store (per-pod caches); see docs/deploy.md 1.5" -}}
{{- end -}}
{{- /* jobs split across replicas: each Ingress replica without a shared store keeps its own, and about half the
GETs land on the other one and 404 */ -}}
{{- if and .Values.jobs.enabled (gt (int (include "instantid.ingressMaxReplicas" .)) 1) (not (include "instantid.jobsRedisSecret" .)) (not .Values.app.jobs.redis_url) -}}
{{- fail (printf "serve.deployments.Ingress can run %v replicas (autoscaling_config.max_replicas) and the jobs have no shared store: set jobs.redis.existingSecret (a Secret with the URL of a managed Redis with a replica; the app reads it from app.jobs.redis_url_env), or jobs.trialRedis.enabled for a trial, or jobs.enabled false (docs/deploy.md 3)" (include "instantid.ingressMaxReplicas" .)) -}}
{{- end -}}
{{- end -}}

{{/*
The model-cache warm-up: `instantid download --config -` reads the app's model references (instantid.warmupConfig,
in the env var INSTANTID_WARMUP_CONFIG: Kubernetes quotes it, no shell does) and fetches every model they name:
each base model, InstantID, the face pack, extra ControlNets, LoRAs, the safety checker when it is on and the
depth/pose preprocessors the ControlNets need, in the dtype the GPU serves (app.dtype "auto" is float16 on CUDA).
*/}}
{{- define "instantid.warmupConfig" -}}
{{- $a := .Values.app -}}
{{- toJson (dict "models" $a.models "instantid" $a.instantid "face_model" $a.face_model "safety" $a.safety "preprocessors" $a.preprocessors) -}}
{{- end -}}

{{- define "instantid.warmupCommand" -}}
{{- $dtype := ternary "float16" .Values.app.dtype (eq .Values.app.dtype "auto") -}}
{{- printf "printf '%%s' \"$INSTANTID_WARMUP_CONFIG\" | instantid download --config - --dtype %s" $dtype -}}
{{- end -}}

{{/*
The model references of app (what instantid.download.config_refs names, in the same order) that need the
Hugging Face hub: a hub repo id (owner/name) or a named face pack (antelopev2 comes from its hub copy); not
s3:// nor a path. JSON list of {field, ref}.
*/}}
{{- define "instantid.hubRefs" -}}
{{- $a := .Values.app -}}
{{- $refs := list (dict "field" "app.face_model" "ref" (toString $a.face_model)) -}}
{{- range $i, $m := $a.models -}}
{{- $refs = append $refs (dict "field" (printf "app.models[%d].base_model" $i) "ref" (toString $m.base_model)) -}}
{{- end -}}
{{- $refs = append $refs (dict "field" "app.instantid" "ref" (toString $a.instantid)) -}}
{{- $kinds := list -}}
{{- range $i, $m := $a.models -}}
{{- range $kind := keys ($m.controlnets | default dict) | sortAlpha -}}
{{- $refs = append $refs (dict "field" (printf "app.models[%d].controlnets.%s" $i $kind) "ref" (toString (index $m.controlnets $kind))) -}}
{{- $kinds = append $kinds $kind -}}
{{- end -}}
{{- range $name := keys ($m.loras | default dict) | sortAlpha -}}
{{- $refs = append $refs (dict "field" (printf "app.models[%d].loras.%s" $i $name) "ref" (toString (index $m.loras $name))) -}}
{{- end -}}
{{- end -}}
{{- if $a.safety.enabled -}}
{{- $refs = append $refs (dict "field" "app.safety.model" "ref" (toString $a.safety.model)) -}}
{{- end -}}
{{- range $kind := list "depth" "pose" -}}
{{- if has $kind $kinds -}}
{{- $refs = append $refs (dict "field" (printf "app.preprocessors.%s" $kind) "ref" (toString (index $a.preprocessors $kind))) -}}
{{- end -}}
{{- end -}}
{{- $out := list -}}
{{- range $refs -}}
{{- if not (or (hasPrefix "s3://" .ref) (hasPrefix "/" .ref) (hasPrefix "." .ref) (hasPrefix "~" .ref)) -}}
{{- $out = append $out . -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}
