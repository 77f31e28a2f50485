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
{{- if not (has .Values.mode (list "auto" "transparent" "hosts-toml")) -}}
{{- fail (printf "mode must be auto, transparent or hosts-toml, not %q" .Values.mode) -}}
{{- end -}}
{{- if not (has .Values.peerData (list "tcp" "quic")) -}}
{{- fail (printf "peerData must be tcp or quic, not %q" .Values.peerData) -}}
{{- end -}}
{{- if and (not .Values.clusterSecret.create) (not .Values.clusterSecret.existingSecret) -}}
{{- fail "clusterSecret.create=false needs clusterSecret.existingSecret" -}}
{{- end -}}
{{- if not (kindIs "map" .Values.tlsIntercept) -}}
{{- fail "tlsIntercept is a map: set tlsIntercept.enabled=true and tlsIntercept.existingSecret=<Secret with ca.crt and ca.key>" -}}
{{- end -}}
{{- if .Values.tlsIntercept.enabled -}}
{{- if eq .Values.mode "hosts-toml" -}}
{{- fail "tlsIntercept.enabled needs mode=transparent or auto (in hosts-toml mode containerd talks plain HTTP to the agent; there is no TLS to intercept)" -}}
{{- end -}}
{{- if not .Values.tlsIntercept.existingSecret -}}
{{- fail "tlsIntercept.enabled=true needs tlsIntercept.existingSecret: the name of a Secret with keys ca.crt and ca.key made by `peerd ca create` (see values.yaml); without one every agent would make its own CA, which no node trusts" -}}
{{- end -}}
{{- end -}}
{{- range .Values.allowedCIDRs -}}
{{- if not (regexMatch "^[0-9a-fA-F:.]+(/[0-9]{1,3})?$" (toString .)) -}}
{{- fail (printf "allowedCIDRs: %q is not an address or ADDRESS/PREFIX" (toString .)) -}}
{{- end -}}
{{- end -}}
{{- range .Values.guardInterfaces -}}
{{- if not (regexMatch "^[A-Za-z0-9_.:@-]{1,15}$" (toString .)) -}}
{{- fail (printf "guardInterfaces: %q is not an interface name" (toString .)) -}}
{{- end -}}
{{- end -}}
{{- if and (has "none" .Values.guardInterfaces) (gt (len .Values.guardInterfaces) 1) -}}
{{- fail "guardInterfaces: [none] disables the guard; it cannot be combined with interface names" -}}
{{- end -}}
{{- end -}}

{{/* Where the intercept CA Secret is mounted (PEERD_TLS_CA_DIR). */}}
{{- define "peerd.interceptCaDir" -}}/etc/peerd/intercept-ca{{- end -}}
