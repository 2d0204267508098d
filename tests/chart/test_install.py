"""``helm install``, upgrade and uninstall on the real control plane, as docs/install.md says.

The commands come from the ``tested:`` blocks of docs/install.md, so the guide
is exactly what runs here. No kubelet runs, so no pod starts: the test plays the
kubelet for the operator and the webhook. It starts each as a local process with
the args, settings and TLS files of the installed objects, authenticated as the
ServiceAccount the chart made (so the chart's RBAC is what is tested). The
webhook runs in a network namespace with a veth pair, and a hand-made
EndpointSlice points the webhook Service at it: the apiserver runs with
--enable-aggregator-routing and calls the ``service:`` clientConfig exactly as
rendered, with TLS checked against the caBundle the operator wrote.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidekey.core import contract
from sidekey.localcluster import helm, processes
from tests.guards import admission, manifests
from tests.support import install
from tests.support.install import documented, run_documented

pytestmark = pytest.mark.e2e

RELEASE, NAMESPACE = "sidekey", "sidekey-system"
FORWARD = Path(__file__).with_name("forward.py")
ETC_NETNS = Path("/etc/netns")


def _json(cluster: Any, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json"))


def _wait(what: str, probe: Callable[[], Any], timeout: float = 60.0, *,
          alive: Callable[[], object] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None:
            alive()
        value = probe()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _sidekey() -> str:
    found = shutil.which("sidekey", path=str(Path(sys.executable).parent))
    assert found, "the sidekey console script is not installed in the venv"
    return found


def _service_account_kubeconfig(cluster: Any, service_account: str, path: Path) -> Path:
    """A kubeconfig with the chart's ServiceAccount token, as in-cluster config would use."""
    token = cluster.token(NAMESPACE, service_account, audience=cluster.issuer, seconds=3600)
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {"server": cluster.url,
                                               "certificate-authority": str(cluster.ca_file)}}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": service_account}}],
    }))
    return path


def _container_args(cluster: Any, deployment: str) -> list[str]:
    deploy = _json(cluster, "-n", NAMESPACE, "get", "deployment", deployment)
    args: list[str] = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def _replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    out = [a for a in args if not a.startswith(f"{flag}=")]
    assert len(out) == len(args) - 1, f"{flag} is not in {args}"
    return [*out, f"{flag}={value}"]


@dataclass
class NetNamespace:
    name: str
    host_ip: str
    inner_ip: str
    host_link: str


@pytest.fixture(scope="module")
def netns() -> Iterator[NetNamespace]:
    """A network namespace joined to the host by a veth pair (10.250.R.1 <-> 10.250.R.2)."""
    suffix = secrets.token_hex(3)
    r = secrets.randbelow(250) + 1
    ns = NetNamespace(f"skw-{suffix}", f"10.250.{r}.1", f"10.250.{r}.2", f"skh{suffix}")
    inner_link = f"skn{suffix}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    ip("netns", "add", ns.name)
    try:
        ip("link", "add", ns.host_link, "type", "veth", "peer", "name", inner_link)
        ip("link", "set", inner_link, "netns", ns.name)
        ip("addr", "add", f"{ns.host_ip}/30", "dev", ns.host_link)
        ip("link", "set", ns.host_link, "up")
        ip("netns", "exec", ns.name, "ip", "addr", "add", f"{ns.inner_ip}/30", "dev", inner_link)
        ip("netns", "exec", ns.name, "ip", "link", "set", inner_link, "up")
        ip("netns", "exec", ns.name, "ip", "link", "set", "lo", "up")
        # `ip netns exec` mounts /etc/netns/NAME/hosts over /etc/hosts: the namespace's DNS.
        ETC_NETNS.joinpath(ns.name).mkdir(parents=True, exist_ok=True)
        ETC_NETNS.joinpath(ns.name, "hosts").write_text(
            f"127.0.0.1 localhost\n{ns.inner_ip} {RELEASE}-webhook.{NAMESPACE}.svc\n")
        yield ns
    finally:
        shutil.rmtree(ETC_NETNS / ns.name, ignore_errors=True)
        subprocess.run(["ip", "link", "del", ns.host_link], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, check=False)


@pytest.fixture(scope="module")
def release(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The chart installed with the documented command; uninstalled (if still there) afterwards."""
    install.adopt_crd(cluster, RELEASE, NAMESPACE)
    [install_output] = run_documented(cluster, "install")
    manifest = helm.run("get", "manifest", RELEASE, "-n", NAMESPACE, env=cluster.env()).stdout
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    try:
        yield {"docs": docs, "tmp": tmp_path_factory.mktemp("release"), "notes": install_output}
    finally:
        helm.run("uninstall", RELEASE, "-n", NAMESPACE, "--ignore-not-found", env=cluster.env(), check=False)


@pytest.fixture(scope="module")
def local_parts(cluster: Any, release: dict[str, Any], netns: NetNamespace) -> Iterator[processes.Processes]:
    """The operator and the webhook, run as the kubelet would run the installed pods."""
    tmp: Path = release["tmp"]
    procs = processes.Processes(tmp / "logs")
    try:
        # The operator, on the host, as its ServiceAccount.
        op_args = _container_args(cluster, f"{RELEASE}-operator")
        op_args = _replace_flag(op_args, "--health-port", str(_free_port()))
        op_args = _replace_flag(op_args, "--metrics-port", str(_free_port()))
        kubeconfig = _service_account_kubeconfig(cluster, f"{RELEASE}-operator", tmp / "operator.kubeconfig")
        operator = procs.start("operator", [_sidekey(), *op_args, f"--kubeconfig={kubeconfig}"])

        def tls_secret() -> dict[str, Any] | None:
            found = cluster.kubectl("-n", NAMESPACE, "get", "secret", contract.WEBHOOK_TLS_SECRET,
                                    "--ignore-not-found", "-o", "json")
            return json.loads(found) if found.strip() else None

        secret = _wait("the operator's TLS Secret", tls_secret, alive=operator.check_alive)
        # The kubelet's part: the Secret volume and the ConfigMap volume, as files.
        tls_dir, settings_dir = tmp / "tls", tmp / "settings"
        tls_dir.mkdir()
        settings_dir.mkdir()
        for key in (contract.TLS_CERT_KEY, contract.TLS_KEY_KEY, contract.TLS_CA_KEY):
            (tls_dir / key).write_bytes(base64.b64decode(secret["data"][key]))
        settings = _json(cluster, "-n", NAMESPACE, "get", "configmap", f"{RELEASE}-webhook-settings")
        (settings_dir / "settings.yaml").write_text(settings["data"]["settings.yaml"])

        # The apiserver listens on the host's loopback only: forward it into the namespace.
        api_port = int(cluster.url.rsplit(":", 1)[1])
        relay = _free_port(netns.host_ip)
        procs.start("relay-host", [sys.executable, str(FORWARD), netns.host_ip, str(relay),
                                   "127.0.0.1", str(api_port)])
        procs.start("relay-netns", ["ip", "netns", "exec", netns.name, sys.executable, str(FORWARD),
                                    "127.0.0.1", str(api_port), netns.host_ip, str(relay)])
        wh_args = _container_args(cluster, f"{RELEASE}-webhook")
        wh_args = _replace_flag(wh_args, "--tls-dir", str(tls_dir))
        wh_args = _replace_flag(wh_args, "--settings", str(settings_dir / "settings.yaml"))
        kubeconfig = _service_account_kubeconfig(cluster, f"{RELEASE}-webhook", tmp / "webhook.kubeconfig")
        webhook = procs.start("webhook", ["ip", "netns", "exec", netns.name, _sidekey(), *wh_args,
                                          f"--kubeconfig={kubeconfig}"])
        port = next(int(a.split("=", 1)[1]) for a in wh_args if a.startswith("--port="))

        server_name = f"{RELEASE}-webhook.{NAMESPACE}.svc"

        def webhook_ready() -> bool:
            """What the apiserver will do: connect to the endpoint, verify the Service's name."""
            ctx = ssl.create_default_context(cafile=str(tls_dir / contract.TLS_CA_KEY))
            try:
                with socket.create_connection((netns.inner_ip, port), timeout=2) as raw, \
                        ctx.wrap_socket(raw, server_hostname=server_name) as conn:
                    conn.sendall(f"GET /readyz HTTP/1.1\r\nHost: {server_name}\r\n"
                                 "Connection: close\r\n\r\n".encode())
                    return conn.recv(64).startswith(b"HTTP/1.1 200")
            except OSError:
                return False

        _wait("the webhook in its network namespace", webhook_ready, alive=procs.alive)
        # What the EndpointSlice controller would write for a ready webhook pod.
        slice_ = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{RELEASE}-webhook-local", "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": f"{RELEASE}-webhook",
                                    "endpointslice.kubernetes.io/managed-by": "sidekey-tests"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [netns.inner_ip], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        }
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(slice_))
        # kube-proxy's part for the Service port (443 -> the pod's https port).
        procs.start("service-port", ["ip", "netns", "exec", netns.name, sys.executable, str(FORWARD),
                                     netns.inner_ip, "443", netns.inner_ip, str(port)])
        yield procs
        procs.alive()
        assert webhook.running
    finally:
        procs.stop_all()


class TestInstall:
    def test_every_object_is_created_and_accepted(self, cluster: Any, release: dict[str, Any]) -> None:
        kinds = {d["kind"] for d in release["docs"]}
        assert {"CustomResourceDefinition", "Deployment", "Service", "MutatingWebhookConfiguration",
                "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "ClusterRole",
                "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount", "ConfigMap",
                "PodDisruptionBudget"} <= kinds
        for doc in release["docs"]:
            meta = doc["metadata"]
            where = ["-n", meta.get("namespace", NAMESPACE)]
            live = _json(cluster, *where, "get", f"{doc['kind']}.{doc['apiVersion'].split('/')[0]}"
                         if "/" in doc["apiVersion"] else doc["kind"], meta["name"])
            assert live["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, meta["name"]
        assert not [d for d in release["docs"] if d["kind"] == "Pod"], "the helm test pod is a hook"

    def test_the_notes_say_what_to_do_next(self, release: dict[str, Any]) -> None:
        notes = release["notes"]
        for step in ("kind: AgentPolicy", 'sidekey.io/inject: "true"', ":8788/metrics",
                     "helm test sidekey -n sidekey-system"):
            assert step in notes, notes

    def test_the_documented_checks_pass(self, cluster: Any, release: dict[str, Any]) -> None:
        outputs = run_documented(cluster, "check")
        assert "sidekey-bypass-guard" in outputs[2] and "sidekey-escalation-guard" in outputs[2]

    def test_the_webhook_configuration_points_at_the_service(self, cluster: Any, release: dict[str, Any]) -> None:
        config = _json(cluster, "get", "mutatingwebhookconfiguration", contract.WEBHOOK_CONFIGURATION)
        for hook in config["webhooks"]:
            service = hook["clientConfig"]["service"]
            assert (service["name"], service["namespace"], service["port"]) == (
                f"{RELEASE}-webhook", NAMESPACE, 443)
            assert hook["failurePolicy"] == "Fail"
        svc = _json(cluster, "-n", NAMESPACE, "get", "service", f"{RELEASE}-webhook")
        assert svc["spec"]["ports"][0]["targetPort"] == "https"

    def test_the_operator_writes_the_ca_bundle_it_signs_with(
            self, cluster: Any, release: dict[str, Any], local_parts: processes.Processes) -> None:
        def bundles() -> list[str] | None:
            config = _json(cluster, "get", "mutatingwebhookconfiguration", contract.WEBHOOK_CONFIGURATION)
            found = [h["clientConfig"].get("caBundle", "") for h in config["webhooks"]]
            return found if all(found) else None

        found = _wait("the caBundle", bundles, alive=local_parts.alive)
        secret = _json(cluster, "-n", NAMESPACE, "get", "secret", contract.WEBHOOK_TLS_SECRET)
        ca = base64.b64decode(secret["data"][contract.TLS_CA_KEY])
        for bundle in found:
            assert base64.b64decode(bundle) == ca

    def test_an_annotated_pod_created_after_install_is_injected(
            self, cluster: Any, release: dict[str, Any], local_parts: processes.Processes,
            namespace: str) -> None:
        for obj in (manifests.service_account(namespace, "agent"), manifests.secret(namespace),
                    manifests.agent_policy(namespace)):
            assert admission.apply(cluster, obj).admitted
        pod = manifests.bare_pod(namespace, "agent", annotations={contract.ANNOTATION_INJECT: "true"})

        def injected() -> admission.Answer | None:
            answer = admission.create(cluster, pod)
            return answer if answer.admitted else None

        answer = _wait("an injected pod", injected, timeout=30, alive=local_parts.alive)
        assert answer.obj is not None
        spec = answer.obj["spec"]
        [sidecar] = spec["initContainers"]
        assert sidecar["name"] == contract.SIDECAR_CONTAINER_NAME
        assert sidecar["image"] == "ghcr.io/sidekey/sidekey:0.1.0"
        assert spec["automountServiceAccountToken"] is False

    def test_helm_test_passes_with_its_pod_run_as_the_kubelet_would(
            self, cluster: Any, release: dict[str, Any], local_parts: processes.Processes,
            netns: NetNamespace) -> None:
        """helm creates the test pod and waits; the test runs the pod's command and reports its phase."""
        [argv] = documented("helm-test")
        assert argv[:2] == ["helm", "test"], argv
        helm_test = subprocess.Popen(
            [str(helm.binary()), *argv[1:]],
            env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            name = f"{RELEASE}-test"

            def test_pod() -> dict[str, Any] | None:
                found = cluster.kubectl("-n", NAMESPACE, "get", "pod", name, "--ignore-not-found", "-o", "json")
                return json.loads(found) if found.strip() else None

            pod = _wait("the helm test pod", test_pod, timeout=30)
            [container] = pod["spec"]["containers"]
            [mount] = container["volumeMounts"]
            volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
            secret = _json(cluster, "-n", NAMESPACE, "get", "secret", volume["secret"]["secretName"])
            ca_dir = release["tmp"] / "test-pod-ca"
            ca_dir.mkdir(exist_ok=True)
            for item in volume["secret"]["items"]:
                (ca_dir / item["path"]).write_bytes(base64.b64decode(secret["data"][item["key"]]))
            assert container["command"][:2] == ["python", "-c"]
            script = container["command"][2].replace(mount["mountPath"], str(ca_dir))
            run = subprocess.run(["ip", "netns", "exec", netns.name, sys.executable, "-c", script],
                                 capture_output=True, text=True, timeout=30, check=False)
            assert run.returncode == 0, run.stdout + run.stderr
            assert "webhook answered 200" in run.stdout
            phase = {"status": {"phase": "Succeeded" if run.returncode == 0 else "Failed"}}
            cluster.kubectl("-n", NAMESPACE, "patch", "pod", name, "--subresource=status",
                            "--type=merge", "-p", json.dumps(phase))
            out, _ = helm_test.communicate(timeout=60)
        finally:
            if helm_test.poll() is None:
                helm_test.kill()
                helm_test.wait()
        assert helm_test.returncode == 0, out
        assert "Succeeded" in out, out

    def test_a_bare_pod_of_a_subject_is_refused_by_the_installed_guard(
            self, cluster: Any, release: dict[str, Any], namespace: str) -> None:
        for obj in (manifests.service_account(namespace, "agent"), manifests.secret(namespace),
                    manifests.agent_policy(namespace)):
            assert admission.apply(cluster, obj).admitted
        answer = admission.wait_until_enforced(cluster, manifests.bare_pod(namespace, "bare"))
        assert not answer.admitted
        assert 'annotate the pod with sidekey.io/inject: "true"' in answer.message

    def test_upgrade_changes_a_value_and_keeps_the_ca_bundle(
            self, cluster: Any, release: dict[str, Any], local_parts: processes.Processes) -> None:
        before = _json(cluster, "get", "mutatingwebhookconfiguration", contract.WEBHOOK_CONFIGURATION)
        assert {h["timeoutSeconds"] for h in before["webhooks"]} == {10}
        run_documented(cluster, "upgrade")
        after = _json(cluster, "get", "mutatingwebhookconfiguration", contract.WEBHOOK_CONFIGURATION)
        assert {h["timeoutSeconds"] for h in after["webhooks"]} == {5}
        assert [h["clientConfig"].get("caBundle") for h in after["webhooks"]] == \
            [h["clientConfig"].get("caBundle") for h in before["webhooks"]]
        history = helm.run("history", RELEASE, "-n", NAMESPACE, env=cluster.env()).stdout
        assert "upgrade complete" in history.lower()

    def test_uninstall_removes_everything_but_the_kept_crd(
            self, cluster: Any, release: dict[str, Any]) -> None:
        run_documented(cluster, "uninstall")
        for doc in release["docs"]:
            meta = doc["metadata"]
            kind = (f"{doc['kind']}.{doc['apiVersion'].split('/')[0]}" if "/" in doc["apiVersion"]
                    else doc["kind"])
            left = cluster.kubectl("-n", meta.get("namespace", NAMESPACE), "get", kind, meta["name"],
                                   "--ignore-not-found", "-o", "name").strip()
            if doc["kind"] == "CustomResourceDefinition":
                assert left, "the CRD must be kept"
            else:
                assert not left, f"{kind}/{meta['name']} survived helm uninstall"
