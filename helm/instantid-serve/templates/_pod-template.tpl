{{/*
Pod template of one Ray node group (head, face, generator).
Call with: dict "root" $ "group" <group values> "component" <label> "containerName" <name>
                "resources" <container resources> "ports" <container ports>
           "affinity" (the group's own with the chart's node affinity added, computed in rayservice.yaml),
           optional "drainSeconds" (worker groups: grace period and preStop drain, see instantid.preStopDrain)
*/}}
{{- define "instantid.podTemplate" -}}
{{- $root := .root -}}
{{- $g := .group -}}
{{- $secretFiles := include "instantid.secretFiles" (dict "root" $root "component" .component) | fromJsonArray -}}
metadata:
  labels:
    {{- include "instantid.podLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with $g.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $g.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if eq .component "head" }}
  serviceAccountName: {{ include "instantid.headServiceAccountName" $root }}
  {{- else }}
  serviceAccountName: {{ include "instantid.serviceAccountName" $root }}
  # Workers never call the Kubernetes API (IRSA and workload identity work without this token).
  automountServiceAccountToken: false
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .drainSeconds }}
  terminationGracePeriodSeconds: {{ . }}
  {{- end }}
  {{- with $g.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and (eq .component "head") $root.Values.modelCache.warmup.enabled }}
  {{- $warmupFiles := include "instantid.secretFiles" (dict "root" $root "component" "warmup") | fromJsonArray }}
  initContainers:
    - name: model-cache-warmup
      image: {{ include "instantid.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["/bin/sh", "-c", {{ include "instantid.warmupCommand" $root | quote }}]
      env:
        {{- include "instantid.env" (dict "root" $root "component" "warmup") | nindent 8 }}
      resources:
        {{- toYaml $root.Values.modelCache.warmup.resources | nindent 8 }}
      {{- with $root.Values.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: model-cache
          mountPath: {{ $root.Values.modelCache.mountPath }}
        {{- range $warmupFiles }}
        - name: {{ .volume }}
          mountPath: {{ .dir }}
          readOnly: true
        {{- end }}
  {{- end }}
  containers:
    - name: {{ .containerName }}
      image: {{ include "instantid.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      ports:
        {{- toYaml .ports | nindent 8 }}
      env:
        {{- include "instantid.env" (dict "root" $root "component" .component) | nindent 8 }}
        {{- with $g.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $root.Values.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml .resources | nindent 8 }}
      {{- with .drainSeconds }}
      lifecycle:
        preStop:
          exec:
            command:
              - /bin/sh
              - -c
              - {{ include "instantid.preStopDrain" (sub (int .) 15) | quote }}
      {{- end }}
      {{- with $root.Values.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: model-cache
          mountPath: {{ $root.Values.modelCache.mountPath }}
        - name: dshm
          mountPath: /dev/shm
        {{- /* "ray-logs": KubeRay's name for /tmp/ray (RayLogVolumeName); it mounts the volume of that name into
        the autoscaler sidecar, so under any other name the autoscaler would write to an emptyDir of its own,
        unbounded and invisible to the head's log tooling */}}
        - name: ray-logs
          mountPath: /tmp/ray
        {{- range $secretFiles }}
        - name: {{ .volume }}
          mountPath: {{ .dir }}
          readOnly: true
        {{- end }}
  volumes:
    - name: model-cache
      {{- if $root.Values.modelCache.persistence.enabled }}
      persistentVolumeClaim:
        claimName: {{ include "instantid.modelCacheClaimName" $root }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ $root.Values.modelCache.emptyDirSizeLimit }}
      {{- end }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $g.shmSize }}
    - name: ray-logs
      emptyDir:
        sizeLimit: {{ $g.rayTmpSize }}
    {{- $volumeFiles := $secretFiles }}
    {{- if and (eq .component "head") $root.Values.modelCache.warmup.enabled }}
    {{- $volumeFiles = concat $volumeFiles (include "instantid.secretFiles" (dict "root" $root "component" "warmup") | fromJsonArray) }}
    {{- end }}
    {{- range $volumeFiles }}
    - name: {{ .volume }}
      secret:
        secretName: {{ .secret }}
        defaultMode: 0440
        items:
          - key: {{ .key }}
            path: {{ .file }}
    {{- end }}
{{- end -}}

{{/* rayStartParams as a YAML map whose values are all strings (the CRD's type). */}}
{{- define "instantid.rayStartParams" -}}
{{- $out := dict -}}
{{- range $key, $val := . -}}
{{- $_ := set $out $key (toString $val) -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}


{{/*
preStop of a worker pod that is evicted or deleted (node drain, scale-down, blue/green cleanup): tell Ray the
node is draining, with the deadline the pod's grace period allows, so Serve starts replacement replicas
elsewhere and stops these gracefully (HAProxy drops them first); then wait until no Serve replica process is
left on this node, or the deadline ([S] keeps the pattern from matching this script's own command line). Only then does the kubelet send SIGTERM to `ray start`. Call with the
deadline in seconds.
*/}}
{{- define "instantid.preStopDrain" -}}
ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --reason-message "pod $HOSTNAME terminating" --deadline-remaining-seconds {{ . }} || true; end=$(( $(date +%s) + {{ . }} )); while grep -qs 'ray::[S]erveReplica' /proc/[0-9]*/cmdline && [ "$(date +%s)" -lt "$end" ]; do sleep 2; done
{{- end -}}
