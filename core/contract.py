"""The contract between the webhook, the sidecar proxy, the operator and the chart.

The webhook writes these names into pod specs and the proxy reads them back at
run time, so they live in exactly one place. Changing a value here changes the
wire contract between an already-injected pod and a newer sidecar: treat each
as a public API.
"""

from __future__ import annotations

from typing import Final, TypedDict

# --- API ------------------------------------------------------------------
GROUP: Final = "sidekey.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "AgentPolicy"
PLURAL: Final = "agentpolicies"
SINGULAR: Final = "agentpolicy"
SHORT_NAMES: Final = ("apol",)

#: The audience of the agent's token. One per installation, never per policy:
#: the apiserver refuses tokens of this audience, so they are useless against it.
DEFAULT_AUDIENCE: Final = "sidekey"
#: Default and minimum lifetime of the agent's token (the kubelet's minimum is 600 s).
DEFAULT_TOKEN_EXPIRATION_SECONDS: Final = 600
MIN_TOKEN_EXPIRATION_SECONDS: Final = 600
#: The sidecar's own API token. Never 3607: the apiserver silently extends
#: exactly-3607-second tokens of its own audience to a year.
SIDECAR_API_TOKEN_EXPIRATION_SECONDS: Final = 3600

# --- Annotations and labels ----------------------------------------------
ANNOTATION_PREFIX: Final = "sidekey.io/"
#: Pod annotation: "true" opts in, "false" opts out. Wins over the namespace label.
ANNOTATION_INJECT: Final = "sidekey.io/inject"
#: Namespace label whose value ``LABEL_INJECT_ENABLED`` opts every pod in.
LABEL_INJECT: Final = "sidekey.io/inject"
LABEL_INJECT_ENABLED: Final = "enabled"
#: Written by the webhook: what it injected (JSON). For people and tools only;
#: nobody trusts it for a security decision, the spec itself is re-checked.
ANNOTATION_STATUS: Final = "sidekey.io/status"
#: Per-pod overrides.
ANNOTATION_PORT: Final = "sidekey.io/port"
ANNOTATION_IMAGE: Final = "sidekey.io/image"  # only values on the settings' allow-list
ANNOTATION_CPU_REQUEST: Final = "sidekey.io/cpu-request"
ANNOTATION_CPU_LIMIT: Final = "sidekey.io/cpu-limit"
ANNOTATION_MEMORY_REQUEST: Final = "sidekey.io/memory-request"
ANNOTATION_MEMORY_LIMIT: Final = "sidekey.io/memory-limit"
#: Documented overrides for pod shapes that weaken the isolation. Each takes "true".
ANNOTATION_ALLOW_PREFIX: Final = "sidekey.io/allow-"
ANNOTATION_ALLOW_HOST_NETWORK: Final = f"{ANNOTATION_ALLOW_PREFIX}host-network"
ANNOTATION_ALLOW_SHARED_PROCESS_NAMESPACE: Final = f"{ANNOTATION_ALLOW_PREFIX}shared-process-namespace"
ANNOTATION_ALLOW_HOST_PID: Final = f"{ANNOTATION_ALLOW_PREFIX}host-pid"
ANNOTATION_ALLOW_PRIVILEGED: Final = f"{ANNOTATION_ALLOW_PREFIX}privileged"
ANNOTATION_ALLOW_HOST_PATH: Final = f"{ANNOTATION_ALLOW_PREFIX}host-path"
ANNOTATION_ALLOW_CAPABILITIES: Final = f"{ANNOTATION_ALLOW_PREFIX}capabilities"
#: Label on objects the operator owns (Roles, RoleBindings, the TLS Secret).
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "sidekey-operator"
LABEL_POLICY: Final = "sidekey.io/policy"

#: Namespaces the webhook never injects into, whatever their labels say. The
#: webhook's own namespace is added at run time.
SYSTEM_NAMESPACES: Final = frozenset({"kube-system", "kube-public", "kube-node-lease"})

# --- The injected sidecar ---------------------------------------------------
SIDECAR_CONTAINER_NAME: Final = "sidekey-proxy"
#: The sidecar's command. An absolute path, so that no ``PATH`` can put another
#: ``sidekey`` first; the image's launcher there runs ``python -I``, so the
#: interpreter ignores ``PYTHON*`` variables and the working directory.
SIDECAR_COMMAND: Final = ("/opt/sidekey/bin/sidekey", "proxy")
DEFAULT_PROXY_PORT: Final = 8787
DEFAULT_HEALTH_PORT: Final = 8788
#: The name of the sidecar's health port in the pod spec (probes and scrapes use it).
HEALTH_PORT_NAME: Final = "sidekey-health"
#: Paths the sidecar serves on its health port: alive, ready (JWKS loaded and
#: policies read once), and Prometheus metrics.
HEALTHZ_PATH: Final = "/healthz"
READY_PATH: Final = "/readyz"
METRICS_PATH: Final = "/metrics"
#: The sidecar's own UID: not the agent's, so the agent cannot ptrace or read it.
SIDECAR_UID: Final = 65532

#: Volume holding the agent's ``sidekey``-audience token. Mounted read-only into
#: agent containers, never into the sidecar-only API volume.
AGENT_TOKEN_VOLUME: Final = "sidekey-token"
AGENT_TOKEN_DIR: Final = "/var/run/secrets/sidekey.io/token"
AGENT_TOKEN_FILENAME: Final = "token"
AGENT_TOKEN_PATH: Final = f"{AGENT_TOKEN_DIR}/{AGENT_TOKEN_FILENAME}"
#: Volume holding the sidecar's API token, CA and namespace: mounted into the
#: sidecar alone, at the path in-cluster config expects.
API_TOKEN_VOLUME: Final = "sidekey-api-access"
API_TOKEN_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
API_TOKEN_FILENAME: Final = "token"
API_CA_FILENAME: Final = "ca.crt"
API_NAMESPACE_FILENAME: Final = "namespace"
#: Volumes the webhook owns. Agent containers must not mount the API one.
SIDEKEY_VOLUMES: Final = frozenset({AGENT_TOKEN_VOLUME, API_TOKEN_VOLUME})
#: The volume name prefix the ServiceAccount admission plugin uses.
KUBE_API_ACCESS_PREFIX: Final = "kube-api-access-"
#: The ConfigMap every namespace holds with the apiserver's CA: the only CA the
#: sidecar trusts for the apiserver.
KUBE_ROOT_CA_CONFIGMAP: Final = "kube-root-ca.crt"

# --- Pod shapes ---------------------------------------------------------------
#: Capabilities that let a process read or control another's memory. "ALL" includes them.
DANGEROUS_CAPABILITIES: Final = frozenset({"SYS_PTRACE", "SYS_ADMIN", "ALL"})
#: Capabilities agent containers must drop when an upstream of their policies is
#: ``insecure`` (plain http on the pod's loopback): with NET_RAW an AF_PACKET
#: socket on ``lo`` reads the key the sidecar attaches; NET_ADMIN reconfigures
#: the pod's network to the same end.
SNIFFING_CAPABILITIES: Final = ("NET_ADMIN", "NET_RAW")

# --- Environment ------------------------------------------------------------
# Set on the sidecar (downward API) so it can check a token is bound to this pod.
ENV_POD_NAME: Final = "POD_NAME"
ENV_POD_NAMESPACE: Final = "POD_NAMESPACE"
ENV_POD_UID: Final = "POD_UID"
ENV_POD_IP: Final = "POD_IP"
#: Every address of the pod (``status.podIPs``, comma-separated): a dual-stack
#: pod has two, and an upstream resolving to either is the pod itself.
ENV_POD_IPS: Final = "POD_IPS"
ENV_SERVICE_ACCOUNT: Final = "POD_SERVICE_ACCOUNT"
# Sidecar settings, set by the webhook from its own settings.
ENV_PROXY_PORT: Final = "SIDEKEY_PORT"
ENV_HEALTH_PORT: Final = "SIDEKEY_HEALTH_PORT"
ENV_AUDIENCE: Final = "SIDEKEY_AUDIENCE"
#: Where the apiserver is, when not the in-cluster default (tests, the demo).
ENV_API_SERVER: Final = "SIDEKEY_API_SERVER"
#: Directory with token, ca.crt and namespace; defaults to API_TOKEN_DIR.
ENV_API_TOKEN_DIR: Final = "SIDEKEY_API_TOKEN_DIR"
#: Optional sidecar settings (defaults in the proxy): where the health/metrics
#: listener binds (default all interfaces, for scraping), how long SIGTERM
#: waits for in-flight requests and streams, and the log level.
ENV_HEALTH_ADDRESS: Final = "SIDEKEY_HEALTH_ADDRESS"
ENV_DRAIN_SECONDS: Final = "SIDEKEY_DRAIN_SECONDS"
ENV_LOG_LEVEL: Final = "SIDEKEY_LOG_LEVEL"
#: Every variable the sidecar reads, for its help text.
SIDECAR_ENV: Final = (
    ENV_POD_NAME, ENV_POD_NAMESPACE, ENV_POD_UID, ENV_POD_IP, ENV_POD_IPS, ENV_SERVICE_ACCOUNT,
    ENV_PROXY_PORT, ENV_HEALTH_PORT, ENV_AUDIENCE, ENV_API_SERVER, ENV_API_TOKEN_DIR,
    ENV_HEALTH_ADDRESS, ENV_DRAIN_SECONDS, ENV_LOG_LEVEL,
)
# Set on agent containers.
ENV_TOKEN_FILE: Final = "SIDEKEY_TOKEN_FILE"
ENV_URL: Final = "SIDEKEY_URL"

# --- Webhook TLS ------------------------------------------------------------
#: The Secret holding the webhook's serving certificate (type kubernetes.io/tls)
#: plus the CA bundle the MutatingWebhookConfiguration must carry. The operator
#: (or cert-manager) writes it; the webhook mounts it and reloads on change.
WEBHOOK_TLS_SECRET: Final = "sidekey-webhook-tls"
TLS_CERT_KEY: Final = "tls.crt"
TLS_KEY_KEY: Final = "tls.key"
TLS_CA_KEY: Final = "ca.crt"
WEBHOOK_CONFIGURATION: Final = "sidekey"
WEBHOOK_NAME: Final = "inject.sidekey.io"
WEBHOOK_PATH: Final = "/mutate"
DEFAULT_WEBHOOK_PORT: Final = 8443
#: The second webhook entry: pods with no inject annotation in a namespace
#: labelled sidekey.io/inject=enabled. matchConditions cannot see namespace
#: labels, so the apiserver checks the label with a namespaceSelector and calls
#: this path; the path is how the webhook knows the namespace opted in.
WEBHOOK_NAMESPACE_NAME: Final = "namespace.inject.sidekey.io"
WEBHOOK_NAMESPACE_PATH: Final = "/mutate/namespace"


def local_base_url(port: int, upstream: str, suffix: str = "") -> str:
    """The base URL an agent SDK is pointed at for one upstream."""
    return f"http://127.0.0.1:{port}/{upstream}{suffix}"


class InjectionStatus(TypedDict):
    """The JSON the webhook writes to ``ANNOTATION_STATUS``: what it injected, for people and tools."""

    image: str
    port: int
    healthPort: int
    audience: str
    tokenExpirationSeconds: int
    policies: list[str]
    upstreams: list[str]
    env: list[str]
    #: Capabilities the webhook dropped from agent containers (SNIFFING_CAPABILITIES
    #: when an upstream is insecure), empty otherwise.
    droppedCapabilities: list[str]
