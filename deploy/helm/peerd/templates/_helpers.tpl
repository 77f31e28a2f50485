{{- define "peerd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "peerd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "peerd.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "peerd.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "peerd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "peerd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "peerd.labels" -}}
{{ include "peerd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "peerd.secretName" -}}
{{- default (printf "%s-cluster-secret" (include "peerd.fullname" .)) .Values.clusterSecret.existingSecret -}}
{{- end -}}

{{/* The headless Service's DNS name: the gossip seeds. */}}
{{- define "peerd.seeds" -}}
{{- printf "%s.%s.svc.%s:%d" (include "peerd.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.gossipPort) -}}
{{- end -}}

{{/* Registries (NAME=URL) the hosts.toml entries are written for: the listed ones, then the
     agent's built-in defaults unless noDefaultRegistries (keep in step with
     peerd-agent/src/mirror/upstream.rs). A listed NAME overrides a default of the same NAME. */}}
{{- define "peerd.hostsTomlRegistries" -}}
{{- $out := list -}}
{{- $names := dict -}}
{{- range .Values.registries -}}
{{- $name := regexReplaceAll "=.*$" . "" -}}
{{- if or (not (contains "=" .)) (eq $name "") -}}
{{- fail (printf "registries: %q must be NAME=URL" .) -}}
{{- end -}}
{{- $_ := set $names $name true -}}
{{- $out = append $out . -}}
{{- end -}}
{{- if not .Values.noDefaultRegistries -}}
{{- range list "docker.io=https://registry-1.docker.io" "ghcr.io=https://ghcr.io" "mcr.microsoft.com=https://mcr.microsoft.com" "registry.k8s.io=https://registry.k8s.io" "quay.io=https://quay.io" -}}
{{- if not (hasKey $names (regexReplaceAll "=.*$" . "")) -}}
{{- $out = append $out . -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- join " " $out -}}
{{- end -}}

{{- define "peerd.validate" -}}
{{- $_ := include "peerd.hostsTomlRegistries" . -}}
{{- if not (has .Values.mode (list "transparent" "hosts-toml")) -}}
{{- fail (printf "mode must be transparent or hosts-toml, not %q" .Values.mode) -}}
{{- end -}}
{{- if and (not .Values.clusterSecret.create) (not .Values.clusterSecret.existingSecret) -}}
{{- fail "clusterSecret.create=false needs clusterSecret.existingSecret" -}}
{{- end -}}
{{- end -}}
