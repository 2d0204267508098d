{{- /*
Generated from core/contract.py, webhook/sidecars.py and crds/ by
tests/chart/test_contract_template.py (SIDEKEY_UPDATE_GOLDENS=1).
Do not edit: change the contract or the sidecar, and regenerate.
The *Check templates are CEL over a container `c`, a volume `v` or the pod `object`.
*/}}
{{- define "sidekey.contract.group" -}}
sidekey.io
{{- end }}
{{- define "sidekey.contract.apiVersion" -}}
sidekey.io/v1alpha1
{{- end }}
{{- define "sidekey.contract.kind" -}}
AgentPolicy
{{- end }}
{{- define "sidekey.contract.plural" -}}
agentpolicies
{{- end }}
{{- define "sidekey.contract.sidecarName" -}}
sidekey-proxy
{{- end }}
{{- define "sidekey.contract.apiVolume" -}}
sidekey-api-access
{{- end }}
{{- define "sidekey.contract.injectKey" -}}
sidekey.io/inject
{{- end }}
{{- define "sidekey.contract.injectEnabled" -}}
enabled
{{- end }}
{{- define "sidekey.contract.imageAnnotation" -}}
sidekey.io/image
{{- end }}
{{- define "sidekey.contract.allowPrefix" -}}
sidekey.io/allow-
{{- end }}
{{- define "sidekey.contract.allowHostNetwork" -}}
sidekey.io/allow-host-network
{{- end }}
{{- define "sidekey.contract.allowSharedProcessNamespace" -}}
sidekey.io/allow-shared-process-namespace
{{- end }}
{{- define "sidekey.contract.allowHostPid" -}}
sidekey.io/allow-host-pid
{{- end }}
{{- define "sidekey.contract.allowPrivileged" -}}
sidekey.io/allow-privileged
{{- end }}
{{- define "sidekey.contract.allowHostPath" -}}
sidekey.io/allow-host-path
{{- end }}
{{- define "sidekey.contract.allowCapabilities" -}}
sidekey.io/allow-capabilities
{{- end }}
{{- define "sidekey.contract.webhookName" -}}
inject.sidekey.io
{{- end }}
{{- define "sidekey.contract.webhookPath" -}}
/mutate
{{- end }}
{{- define "sidekey.contract.webhookNamespaceName" -}}
namespace.inject.sidekey.io
{{- end }}
{{- define "sidekey.contract.webhookNamespacePath" -}}
/mutate/namespace
{{- end }}
{{- define "sidekey.contract.healthPortName" -}}
sidekey-health
{{- end }}
{{- define "sidekey.contract.healthzPath" -}}
/healthz
{{- end }}
{{- define "sidekey.contract.readyPath" -}}
/readyz
{{- end }}
{{- define "sidekey.contract.metricsPath" -}}
/metrics
{{- end }}
{{- define "sidekey.contract.systemNamespaces" -}}
["kube-node-lease", "kube-public", "kube-system"]
{{- end }}
{{- define "sidekey.contract.command" -}}
["/opt/sidekey/bin/sidekey", "proxy"]
{{- end }}
{{- define "sidekey.contract.traceCapabilities" -}}
["ALL", "CAP_ALL", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "SYS_ADMIN", "SYS_PTRACE"]
{{- end }}
{{- define "sidekey.contract.traceCapabilitiesText" -}}
ALL, SYS_ADMIN, SYS_PTRACE
{{- end }}
{{- define "sidekey.contract.controlCapabilities" -}}
["ALL", "CAP_ALL", "CAP_SYS_ADMIN", "SYS_ADMIN"]
{{- end }}
{{- define "sidekey.contract.sniffingCapabilities" -}}
["ALL", "CAP_ALL", "CAP_NET_ADMIN", "CAP_NET_RAW", "NET_ADMIN", "NET_RAW"]
{{- end }}
{{- define "sidekey.contract.sniffingDrop" -}}
["NET_ADMIN", "NET_RAW"]
{{- end }}
{{- define "sidekey.contract.sniffingCapabilitiesText" -}}
NET_ADMIN, NET_RAW
{{- end }}
{{- define "sidekey.contract.sidecarFieldEnv" -}}
{"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "POD_UID": "metadata.uid", "POD_IP": "status.podIP", "POD_IPS": "status.podIPs", "POD_SERVICE_ACCOUNT": "spec.serviceAccountName"}
{{- end }}
{{- define "sidekey.contract.apiTokenExpirationSeconds" -}}
3600
{{- end }}
{{- define "sidekey.contract.maxUpstreams" -}}
32
{{- end }}
{{- define "sidekey.contract.maxSubjects" -}}
64
{{- end }}
{{- /* The plain env vars of the sidecar and their values; "" means any port number. */}}
{{- define "sidekey.contract.sidecarValueEnv" -}}
{{- dict "SIDEKEY_PORT" "" "SIDEKEY_HEALTH_PORT" (toString .Values.sidecar.healthPort) "SIDEKEY_AUDIENCE" (toString .Values.sidecar.audience) | toJson }}
{{- end }}
{{- define "sidekey.contract.sidecarCommandCheck" -}}
has(c.command) && c.command == ["/opt/sidekey/bin/sidekey", "proxy"] && !has(c.args)
{{- end }}
{{- define "sidekey.contract.sidecarMountsCheck" -}}
has(c.volumeMounts) && c.volumeMounts.size() == 1 && has(c.volumeMounts[0].name) && c.volumeMounts[0].name == "sidekey-api-access" && has(c.volumeMounts[0].mountPath) && c.volumeMounts[0].mountPath == "/var/run/secrets/kubernetes.io/serviceaccount" && has(c.volumeMounts[0].readOnly) && c.volumeMounts[0].readOnly == true && !has(c.volumeMounts[0].subPath) && !has(c.volumeMounts[0].subPathExpr) && !has(c.volumeMounts[0].mountPropagation) && !has(c.volumeMounts[0].recursiveReadOnly)
{{- end }}
{{- define "sidekey.contract.sidecarPortsCheck" -}}
has(c.ports) && c.ports.size() == 1 && has(c.ports[0].name) && c.ports[0].name == "sidekey-health" && has(c.ports[0].containerPort) && c.ports[0].containerPort == {{ .Values.sidecar.healthPort }} && has(c.ports[0].protocol) && c.ports[0].protocol == "TCP" && !has(c.ports[0].hostIP)
{{- end }}
{{- define "sidekey.contract.sidecarSecurityContextCheck" -}}
has(c.securityContext) && has(c.securityContext.runAsUser) && c.securityContext.runAsUser == 65532 && has(c.securityContext.runAsGroup) && c.securityContext.runAsGroup == 65532 && has(c.securityContext.runAsNonRoot) && c.securityContext.runAsNonRoot == true && has(c.securityContext.readOnlyRootFilesystem) && c.securityContext.readOnlyRootFilesystem == true && has(c.securityContext.allowPrivilegeEscalation) && c.securityContext.allowPrivilegeEscalation == false && has(c.securityContext.privileged) && c.securityContext.privileged == false && has(c.securityContext.capabilities) && has(c.securityContext.capabilities.drop) && c.securityContext.capabilities.drop == ["ALL"] && !has(c.securityContext.capabilities.add) && has(c.securityContext.seccompProfile) && has(c.securityContext.seccompProfile.type) && c.securityContext.seccompProfile.type == "RuntimeDefault" && !has(c.securityContext.seccompProfile.localhostProfile) && !has(c.securityContext.seLinuxOptions) && !has(c.securityContext.windowsOptions) && !has(c.securityContext.procMount) && !has(c.securityContext.appArmorProfile)
{{- end }}
{{- define "sidekey.contract.sidecarFixedFieldsCheck" -}}
has(c.restartPolicy) && c.restartPolicy == "Always" && has(c.terminationMessagePath) && c.terminationMessagePath == "/dev/termination-log" && has(c.terminationMessagePolicy) && c.terminationMessagePolicy == "File" && !has(c.workingDir) && !has(c.envFrom) && !has(c.volumeDevices) && !has(c.lifecycle)
{{- end }}
{{- define "sidekey.contract.apiVolumeCheck" -}}
has(v.projected) && has(v.projected.defaultMode) && v.projected.defaultMode == 420 && has(v.projected.sources) && v.projected.sources.size() == 3 && has(v.projected.sources[0].serviceAccountToken) && has(v.projected.sources[0].serviceAccountToken.expirationSeconds) && v.projected.sources[0].serviceAccountToken.expirationSeconds == 3600 && has(v.projected.sources[0].serviceAccountToken.path) && v.projected.sources[0].serviceAccountToken.path == "token" && !has(v.projected.sources[0].serviceAccountToken.audience) && has(v.projected.sources[1].configMap) && has(v.projected.sources[1].configMap.name) && v.projected.sources[1].configMap.name == "kube-root-ca.crt" && has(v.projected.sources[1].configMap.items) && v.projected.sources[1].configMap.items.size() == 1 && has(v.projected.sources[1].configMap.items[0].key) && v.projected.sources[1].configMap.items[0].key == "ca.crt" && has(v.projected.sources[1].configMap.items[0].path) && v.projected.sources[1].configMap.items[0].path == "ca.crt" && !has(v.projected.sources[1].configMap.items[0].mode) && !has(v.projected.sources[1].configMap.optional) && has(v.projected.sources[2].downwardAPI) && has(v.projected.sources[2].downwardAPI.items) && v.projected.sources[2].downwardAPI.items.size() == 1 && has(v.projected.sources[2].downwardAPI.items[0].path) && v.projected.sources[2].downwardAPI.items[0].path == "namespace" && has(v.projected.sources[2].downwardAPI.items[0].fieldRef) && has(v.projected.sources[2].downwardAPI.items[0].fieldRef.apiVersion) && v.projected.sources[2].downwardAPI.items[0].fieldRef.apiVersion == "v1" && has(v.projected.sources[2].downwardAPI.items[0].fieldRef.fieldPath) && v.projected.sources[2].downwardAPI.items[0].fieldRef.fieldPath == "metadata.namespace" && !has(v.projected.sources[2].downwardAPI.items[0].mode) && !has(v.projected.sources[2].downwardAPI.items[0].resourceFieldRef)
{{- end }}
{{- define "sidekey.contract.podSpecCheck" -}}
has(object.spec.automountServiceAccountToken) && object.spec.automountServiceAccountToken == false && has(object.spec.enableServiceLinks) && object.spec.enableServiceLinks == false
{{- end }}
{{- define "sidekey.contract.podSpecText" -}}
automountServiceAccountToken: false, enableServiceLinks: false
{{- end }}
