{{/*
Pod template of a Ray node (head or worker). ctx: dict root, track, kind ("head"|"worker"),
group (the worker group values or serve.head), containerName.
*/}}
{{- define "kuberank.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $ctx := dict "root" $root "track" .track -}}
metadata:
  labels:
    {{- include "kuberank.labels" $root | nindent 4 }}
    app.kubernetes.io/component: serve
    kuberank.io/track: {{ .track }}
    {{- with $v.serve.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.serve.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "kuberank.serveServiceAccountName" $root }}
  {{- /* The chart's service accounts mount no token, so each pod says what it needs: the
         autoscaler sidecar KubeRay adds to the head reads the pod's token to reach the API
         server (without it, it crash-loops); nothing else talks to the API server. */}}
  automountServiceAccountToken: {{ and (eq .kind "head") $v.serve.autoscaler.enabled }}
  {{- with include "kuberank.imagePullSecrets" $root }}{{ . | trim | nindent 2 }}{{ end }}
  {{- with include "kuberank.podPriorityClassName" (dict "root" $root "name" $v.serve.priorityClassName) }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml $v.serve.podSecurityContext | nindent 4 }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .containerName }}
      image: {{ include "kuberank.serveImage" $ctx }}
      imagePullPolicy: {{ $v.serve.image.pullPolicy }}
      env:
        - name: KUBERANK_MODEL_STORE
          value: {{ include "kuberank.modelStore" $ctx | quote }}
        - name: KUBERANK_TRACK
          value: {{ .track }}
        - name: HOME
          value: /tmp/home
        - name: XDG_CACHE_HOME
          value: /tmp/cache
        - name: HF_HUB_OFFLINE
          value: "1"
        - name: RAY_USAGE_STATS_ENABLED
          value: "0"
        {{- /* replicas at the priority of Ray's own daemons, not niceness 15 under them,
               whose bursts would stall them (docs/serving.md) */}}
        - name: RAY_worker_niceness
          value: "0"
        {{- if eq $v.serve.ingressMode "haproxy" }}
        - name: RAY_SERVE_ENABLE_HA_PROXY
          value: "1"
        {{- end }}
        {{- with include "kuberank.s3Env" $root }}{{ . | trim | nindent 8 }}{{ end }}
        {{- with $v.serve.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        {{- if eq .kind "head" }}
        - name: gcs
          containerPort: 6379
          protocol: TCP
        - name: dashboard
          containerPort: 8265
          protocol: TCP
        - name: client
          containerPort: 10001
          protocol: TCP
        {{- end }}
        - name: serve
          containerPort: {{ $v.serve.port }}
          protocol: TCP
        {{- /* Named `metrics`: KubeRay adds a head Service port `metrics: 8080` unless a
               container port has that name, and a second name on 8080 would make the API
               server refuse the Service (duplicate port). */}}
        - name: metrics
          containerPort: 8080
          protocol: TCP
      resources:
        {{- toYaml .group.resources | nindent 8 }}
      securityContext:
        {{- toYaml $v.serve.containerSecurityContext | nindent 8 }}
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        - name: tmp
          mountPath: /tmp
        {{- if $v.modelStore.pvc.enabled }}
        - name: model-store
          mountPath: {{ $v.modelStore.pvc.mountPath }}
          readOnly: true
          {{- with include "kuberank.modelStoreSubPath" $ctx }}
          subPath: {{ . }}
          {{- end }}
        {{- end }}
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.serve.shmSize }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ $v.serve.tmpSize }}
    {{- if $v.modelStore.pvc.enabled }}
    - name: model-store
      persistentVolumeClaim:
        claimName: {{ required "modelStore.pvc.claimName is required when modelStore.pvc.enabled" $v.modelStore.pvc.claimName }}
        readOnly: true
    {{- end }}
{{- end -}}

{{/* serveConfigV2 of a track, as YAML. ctx: dict root, track. */}}
{{- define "kuberank.serveConfig" -}}
{{- $v := .root.Values -}}
{{- $ctx := dict "root" .root "track" .track -}}
{{- $args := dict "model_store" (include "kuberank.modelStore" $ctx) "triton_url" "" -}}
{{- if $v.triton.enabled }}{{ $_ := set $args "triton_url" (include "kuberank.tritonURL" $ctx) }}{{ end -}}
{{- $args = merge $args (deepCopy ($v.serve.args | default dict)) -}}
{{- $deployments := list -}}
{{- range $name, $opts := $v.serve.deployments -}}
{{- $deployments = append $deployments (merge (dict "name" $name) (deepCopy $opts)) -}}
{{- end -}}
{{- $app := dict "name" $v.serve.appName "import_path" $v.serve.importPath "route_prefix" $v.serve.routePrefix "args" $args "deployments" $deployments -}}
{{- $cfg := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" (int $v.serve.port)) "applications" (list $app) -}}
{{- toYaml $cfg -}}
{{- end -}}
