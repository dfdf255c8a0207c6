{{/* vim: set filetype=mustache: */}}
{{/*
Names. The prefix is truncated to 40 characters: KubeRay derives RayCluster, head Service and
serve Service names from the RayService name and adds suffixes of its own.
*/}}
{{- define "kuberank.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "kuberank.fullname" -}}
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

{{- define "kuberank.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels shared by every workload of the release. */}}
{{- define "kuberank.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kuberank.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kuberank.labels" -}}
helm.sh/chart: {{ include "kuberank.chart" . }}
{{ include "kuberank.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kuberank
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kuberank.annotations" -}}
{{- with .Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Tracks: "stable" always, "canary" when canary.enabled. Each track is one RayService and (when
Triton is enabled) one Triton Deployment + Service. Usage:
  {{- range $track := include "kuberank.tracks" . | fromYamlArray }}
*/}}
{{- define "kuberank.tracks" -}}
- stable
{{- if .Values.canary.enabled }}
- canary
{{- end }}
{{- end -}}

{{/* Object-name suffix of a track: "" for stable, "-canary" for canary. ctx: (dict "track" t) */}}
{{- define "kuberank.trackSuffix" -}}
{{- if eq . "canary" }}-canary{{ end -}}
{{- end -}}

{{/* RayService name of a track. ctx: (dict "root" $ "track" t) */}}
{{- define "kuberank.rayServiceName" -}}
{{- printf "%s%s" (include "kuberank.fullname" .root) (include "kuberank.trackSuffix" .track) -}}
{{- end -}}

{{/* The Service KubeRay creates for a RayService's serve endpoints: <rayservice>-serve-svc. */}}
{{- define "kuberank.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "kuberank.rayServiceName" .) -}}
{{- end -}}

{{- define "kuberank.tritonName" -}}
{{- printf "%s%s-triton" (include "kuberank.fullname" .root) (include "kuberank.trackSuffix" .track) -}}
{{- end -}}

{{/* Model store URI of a track (S3 mode) or its mount path (PVC mode). */}}
{{- define "kuberank.modelStore" -}}
{{- $v := .root.Values -}}
{{- if $v.modelStore.pvc.enabled -}}
{{- $v.modelStore.pvc.mountPath -}}
{{- else if and (eq .track "canary") $v.canary.modelStoreUri -}}
{{- $v.canary.modelStoreUri | trimSuffix "/" -}}
{{- else -}}
{{- $v.modelStore.uri | trimSuffix "/" -}}
{{- end -}}
{{- end -}}

{{- define "kuberank.modelStoreSubPath" -}}
{{- $v := .root.Values -}}
{{- if and (eq .track "canary") $v.canary.modelStoreSubPath -}}
{{- $v.canary.modelStoreSubPath -}}
{{- else -}}
{{- $v.modelStore.pvc.subPath -}}
{{- end -}}
{{- end -}}

{{/*
Triton's --model-repository. S3 with a custom endpoint uses Triton's
s3://host:port/bucket/path form.
*/}}
{{- define "kuberank.tritonModelRepository" -}}
{{- $v := .root.Values -}}
{{- $store := include "kuberank.modelStore" . -}}
{{- if $v.modelStore.pvc.enabled -}}
{{- printf "%s/triton" $store -}}
{{- else if $v.modelStore.s3.endpoint -}}
{{- $endpoint := $v.modelStore.s3.endpoint | trimSuffix "/" -}}
{{- printf "s3://%s/%s/triton" $endpoint (trimPrefix "s3://" $store) -}}
{{- else -}}
{{- printf "%s/triton" $store -}}
{{- end -}}
{{- end -}}

{{- define "kuberank.tritonURL" -}}
{{- printf "%s.%s.svc.cluster.local:%d" (include "kuberank.tritonName" .) .root.Release.Namespace (int .root.Values.triton.ports.grpc) -}}
{{- end -}}

{{/* registry/repository@digest when a digest is given (the tag is then documentation only),
else registry/repository:tag. */}}
{{- define "kuberank.image" -}}
{{- if .digest -}}
{{- printf "%s/%s@%s" .registry .repository .digest -}}
{{- else -}}
{{- printf "%s/%s:%s" .registry .repository (toString .tag) -}}
{{- end -}}
{{- end -}}

{{/* The canary reuses the stable's tag and digest unless it names a tag or digest of its own
(then the stable's digest, which pins another image, is not reused). */}}
{{- define "kuberank.serveImage" -}}
{{- $img := .root.Values.serve.image -}}
{{- $c := .root.Values.canary -}}
{{- $tag := $img.tag -}}
{{- $digest := $img.digest -}}
{{- if and (eq .track "canary") (or $c.serveImageTag $c.serveImageDigest) }}
{{- $tag = $c.serveImageTag | default $img.tag }}
{{- $digest = $c.serveImageDigest }}
{{- end -}}
{{- include "kuberank.image" (dict "registry" $img.registry "repository" $img.repository "tag" $tag "digest" $digest) -}}
{{- end -}}

{{- define "kuberank.tritonImage" -}}
{{- $img := .root.Values.triton.image -}}
{{- $c := .root.Values.canary -}}
{{- $tag := $img.tag -}}
{{- $digest := $img.digest -}}
{{- if and (eq .track "canary") (or $c.tritonImageTag $c.tritonImageDigest) }}
{{- $tag = $c.tritonImageTag | default $img.tag }}
{{- $digest = $c.tritonImageDigest }}
{{- end -}}
{{- include "kuberank.image" (dict "registry" $img.registry "repository" $img.repository "tag" $tag "digest" $digest) -}}
{{- end -}}

{{/* `release: <metrics.release>` as YAML (kube-prometheus-stack's default selector), or nothing. */}}
{{- define "kuberank.prometheusReleaseLabel" -}}
{{- with .Values.metrics.release }}release: {{ . | quote }}{{ end -}}
{{- end -}}

{{/* S3 environment shared by Triton and Ray containers (no secret values: a secretKeyRef at most). */}}
{{- define "kuberank.s3Env" -}}
{{- $s3 := .Values.modelStore.s3 -}}
{{- if not .Values.modelStore.pvc.enabled }}
- name: AWS_DEFAULT_REGION
  value: {{ $s3.region | quote }}
- name: AWS_REGION
  value: {{ $s3.region | quote }}
{{- if $s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ $s3.endpoint | quote }}
{{- end }}
{{- if $s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $s3.existingSecret }}
      key: {{ $s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $s3.existingSecret }}
      key: {{ $s3.secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "kuberank.serveServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ printf "%s-serve" (include "kuberank.fullname" .) }}{{- else -}}default{{- end -}}
{{- end -}}

{{- define "kuberank.tritonServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ printf "%s-triton" (include "kuberank.fullname" .) }}{{- else -}}default{{- end -}}
{{- end -}}

{{/* Name of the PriorityClass the chart creates (priorityClass.create). */}}
{{- define "kuberank.priorityClassName" -}}
{{- .Values.priorityClass.name | default (printf "%s-serving" (include "kuberank.fullname" .)) -}}
{{- end -}}

{{/* priorityClassName of a pod: its own value, else the chart's PriorityClass when created.
ctx: dict root, name (the component's priorityClassName value). */}}
{{- define "kuberank.podPriorityClassName" -}}
{{- if .name -}}
{{- .name -}}
{{- else if .root.Values.priorityClass.create -}}
{{- include "kuberank.priorityClassName" .root -}}
{{- end -}}
{{- end -}}

{{- define "kuberank.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* PromQL label matchers selecting this release's app metrics (the ServiceMonitor adds
namespace, service and track labels to every scraped series). */}}
{{- define "kuberank.metricsSelector" -}}
{{- printf "namespace=\"%s\",service=\"%s-serve-metrics\"" .Release.Namespace (include "kuberank.fullname" .) -}}
{{- end -}}

{{- define "kuberank.tritonMetricsSelector" -}}
{{- printf "namespace=\"%s\",service=~\"%s(-canary)?-triton\"" .Release.Namespace (include "kuberank.fullname" .) -}}
{{- end -}}
