{{/*
The Ray Serve config (serveConfigV2) of the RayService: one application, "instantid", built by
deployments.app:build_app from `.Values.app` (validated by deployments/config.py:AppArgs), with the
three deployments' settings from `.Values.serve.deployments`.

Placement is decided here, not in the Python code (Serve applies these ray_actor_options over the code's):
  - Ingress and FaceAnalyzer request one unit of the face group's custom resource, so they run only there
    (never on the head, whose num-cpus is 0, and never on a GPU pod, which would then never idle out);
  - Generator requests GPUs, which only the generator group has.
*/}}
{{- define "instantid.serveConfig" -}}
{{- $pool := include "instantid.cpuPoolResource" . -}}
{{- $args := deepCopy .Values.app -}}
{{- $_ := set $args.auth "key_hashes_env" "INSTANTID_API_KEY_HASHES" -}}
{{- if not .Values.jobs.enabled -}}
{{- $_ := set $args.jobs "enabled" false -}}
{{- end -}}
{{- $ingress := deepCopy .Values.serve.deployments.Ingress -}}
{{- $_ := set $ingress.ray_actor_options "resources" (dict $pool 1) -}}
{{- $face := deepCopy .Values.serve.deployments.FaceAnalyzer -}}
{{- $_ := set $face.ray_actor_options "resources" (dict $pool 1) -}}
{{- $generator := deepCopy .Values.serve.deployments.Generator -}}
proxy_location: {{ .Values.serve.proxyLocation }}
http_options:
  {{- toYaml .Values.serve.httpOptions | nindent 2 }}
logging_config:
  {{- toYaml .Values.serve.loggingConfig | nindent 2 }}
applications:
  - name: instantid
    route_prefix: /
    import_path: deployments.app:build_app
    args:
      {{- toYaml $args | nindent 6 }}
    deployments:
      - name: Ingress
        {{- toYaml $ingress | nindent 8 }}
      - name: FaceAnalyzer
        {{- toYaml $face | nindent 8 }}
      - name: Generator
        {{- toYaml $generator | nindent 8 }}
{{- end -}}
