"""The main flows on the real node: the chart installed, an agent pod injected, and what happens to it.

Everything here runs for real: the image built by localcluster/image.py, the
chart installed with helm as docs/install.md says (plus the local image),
the webhook called by the apiserver through its Service, the kubelet writing
the projected tokens and running the native sidecar before the agent, the
real ``openai`` SDK in the agent container, SIGTERM and the grace period.
The mock upstream (localcluster/upstreams.py) runs on the bridge address
(pods cannot reach the host's loopback) over real TLS, and records which key
each request carried.

Flows (issue 13, part 3): inject and call; refusals on a running pod;
rotation and edits; ``kubectl debug``; shutdown. Install and webhook-down
are in test_install.py.
"""

from __future__ import annotations

import datetime
import json
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidekey.core import contract
from tests.node import pods
from tests.support.namespaces import make_namespace

# The first test's fixtures build the two images (cold: mmdebstrap and pip, minutes).
pytestmark = [pytest.mark.e2e, pytest.mark.node, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
RELEASE, SYSTEM_NS = "sidekey", "sidekey-system"
SA = "research-agent"
KEYS = {"first": f"sk-node-first-{secrets.token_hex(12)}", "second": f"sk-node-second-{secrets.token_hex(12)}"}

# The agent's main process: one streamed chat completion with the real SDK,
# the token file read per request (the SDK calls api_key each time), then idle
# until SIGTERM, which it handles (Python as PID 1 would otherwise ignore it).
AGENT_MAIN = r"""
import os, signal, time, openai
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(time.time()))
token_file = os.environ["SIDEKEY_TOKEN_FILE"]
print("agent start", flush=True)
client = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], max_retries=0,
                       api_key=lambda: open(token_file).read().strip())
stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say hello."}], stream=True)
print("agent streamed:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices), flush=True)
while not stopping:
    time.sleep(0.1)
print("agent stopping on SIGTERM", flush=True)
"""

# A long stream through the sidecar that a SIGTERM must not cut short.
DRAIN_MAIN = r"""
import os, signal, time, httpx
began = time.time()
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(time.time()))
token = open(os.environ["SIDEKEY_TOKEN_FILE"]).read().strip()
events = 0
with httpx.stream("GET", os.environ["OPENAI_BASE_URL"] + "/slow?n=40", timeout=60,
                  headers={"Authorization": "Bearer " + token}) as resp:
    print("drain stream open", resp.status_code, flush=True)
    for line in resp.iter_lines():
        if line.startswith("data:"):
            events += 1
end = time.time()
sig = round(stopping[0] - began, 2) if stopping else None
print(f"drain done events={events} sigterm_at={sig} finished_at={round(end - began, 2)}", flush=True)
"""

# Run inside a container with kubectl exec: one call through the sidecar, as JSON.
CALL = r"""
import json, os, sys, urllib.request, urllib.error
method, path, token = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
if token is None:
    token = open(os.environ["SIDEKEY_TOKEN_FILE"]).read().strip()
data = b'{"model": "m", "input": "hi"}' if method == "POST" else None
req = urllib.request.Request(os.environ["OPENAI_BASE_URL"] + path, data=data, method=method,
                             headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=20) as resp:
        print(json.dumps({"status": resp.status, "body": resp.read().decode()[:300]}))
except urllib.error.HTTPError as exc:
    print(json.dumps({"status": exc.code, "body": exc.read().decode()[:300]}))
"""

# What the agent container holds: the token file's mode and owner, whether
# it can read it, and whether any API credential is on its disk.
INSPECT = r"""
import json, os, stat
path = os.environ["SIDEKEY_TOKEN_FILE"]
st = os.stat(path)
try:
    readable = bool(open(path).read().strip())
except OSError as exc:
    readable = repr(exc)
mounts = [line.split()[1] for line in open("/proc/self/mounts")]
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
    "mode": oct(stat.S_IMODE(st.st_mode)), "owner": [st.st_uid, st.st_gid], "readable": readable,
    "api_token_dir": os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount"),
    "secret_mounts": [m for m in mounts if "secrets" in m],
}))
"""


@dataclass
class World:
    cluster: Any
    namespace: str
    mock: Any
    agent_image: str
    policy: dict[str, Any] = field(default_factory=dict)
    agent_pod: str = ""  # the agent Deployment's pod

    def kubectl(self, *args: str, **kw: Any) -> str:
        return str(self.cluster.kubectl("-n", self.namespace, *args, **kw))

    def exec_json(self, pod: str, script: str, *args: str, container: str = "agent") -> dict[str, Any]:
        out = self.kubectl("exec", pod, "-c", container, "--", "python", "-c", script, *args)
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def call(self, pod: str, method: str, path: str, token: str | None = None) -> dict[str, Any]:
        return self.exec_json(pod, CALL, method, path, *([token] if token else []))

    def seen_keys(self) -> list[str]:
        return [s.key for s in self.mock.seen]


def _helm(cluster: Any, *args: str, timeout: float = 300) -> str:
    proc = subprocess.run([str(cluster.bin_dir / "helm"), *args], capture_output=True, text=True,
                          env=cluster.env(), timeout=timeout, check=False)
    assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


def _wait(what: str, probe: Callable[[], Any], timeout: float = 90, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def installed(node_cluster: Any, sidekey_image: Any) -> Iterator[None]:
    """helm install as docs/install.md says, pointed at the image built and imported here."""
    repository, _sep, tag = sidekey_image.name.rpartition(":")
    chart = ROOT / "charts" / "sidekey"
    began = time.monotonic()
    _helm(node_cluster, "install", RELEASE, str(chart), "--namespace", SYSTEM_NS, "--create-namespace",
          "--set", f"image.repository={repository}", "--set", f"image.tag={tag}", "--wait", "--timeout", "240s")

    def ca_bundle_written() -> bool:
        mwc = node_cluster.request("GET", f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{RELEASE}")
        return all(w.get("clientConfig", {}).get("caBundle") for w in mwc["webhooks"])

    _wait("the operator to write the webhook's caBundle", ca_bundle_written)
    print(f"chart installed and webhook CA written in {time.monotonic() - began:.1f}s")
    try:
        yield
    finally:
        _helm(node_cluster, "uninstall", RELEASE, "--namespace", SYSTEM_NS, "--wait", "--timeout", "120s")
        node_cluster.kubectl("delete", "namespace", SYSTEM_NS, "--ignore-not-found", "--timeout=120s", check=False)


@pytest.fixture(scope="module")
def world(node_cluster: Any, installed: None, agent_image: Any) -> Iterator[World]:
    from sidekey.localcluster import node, upstreams

    mock = upstreams.MockLLM(keys=KEYS)
    mock.start(host=node.GATEWAY)  # pods reach the bridge address, not the host's loopback
    ns = make_namespace(node_cluster, "team", labels={contract.LABEL_INJECT: contract.LABEL_INJECT_ENABLED})
    w = World(node_cluster, ns, mock, agent_image.name)
    w.policy = {
        "apiVersion": contract.API_VERSION, "kind": contract.KIND,
        "metadata": {"name": "openai", "namespace": ns},
        "spec": {"subjects": {"serviceAccounts": [SA]},
                 "upstreams": [{
                     "name": "openai", "url": mock.url, "caBundle": mock.ca_pem,
                     "auth": {"type": "bearer", "secretRef": {"name": "openai-key", "key": "api-key"}},
                     "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]},
                               {"methods": ["GET"], "paths": ["/models", "/slow"]}],
                     "limits": {"requestsPerMinute": 600},
                     "env": [{"name": "OPENAI_BASE_URL"}]}]},
    }
    for manifest in (
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SA, "namespace": ns}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "openai-key", "namespace": ns},
         "stringData": {"api-key": KEYS["first"]}},
        w.policy,
    ):
        pods.apply(node_cluster, manifest)
    w.kubectl("wait", "--for=condition=Ready", "--timeout=60s", "agentpolicy/openai")
    try:
        yield w
    finally:
        node_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        mock.stop()


def agent_pod(w: World, name: str, script: str = AGENT_MAIN, *, fs_group: int | None = None) -> dict[str, Any]:
    """An agent pod as a team writes it: the annotation and the account, nothing else about sidekey."""
    spec: dict[str, Any] = {
        "serviceAccountName": SA,
        "containers": [{"name": "agent", "image": w.agent_image, "imagePullPolicy": "Never",
                        "command": ["python", "-c", script]}],
    }
    if fs_group is not None:
        spec["securityContext"] = {"fsGroup": fs_group}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": w.namespace, "labels": {"app": name},
                         "annotations": {contract.ANNOTATION_INJECT: "true"}},
            "spec": spec}


def _timestamps(w: World, pod: str, container: str) -> list[tuple[datetime.datetime, str]]:
    out = w.kubectl("logs", pod, "-c", container, "--timestamps")
    lines = []
    for line in out.splitlines():
        stamp, _sp, text = line.partition(" ")
        lines.append((datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")), text))
    return lines


def _running_pod(w: World, manifest: dict[str, Any]) -> tuple[dict[str, Any], float]:
    began = time.monotonic()
    pods.apply(w.cluster, manifest)
    name = manifest["metadata"]["name"]
    _wait(f"pod {name} to run with the agent started", lambda: _agent_streamed(w, name), timeout=90)
    return pods.get(w.cluster, w.namespace, name), time.monotonic() - began


def _agent_streamed(w: World, name: str) -> bool:
    status = pods.get(w.cluster, w.namespace, name).get("status", {})
    if status.get("phase") != "Running":
        return False
    return "agent streamed:" in w.kubectl("logs", name, "-c", "agent", check=False)


@pytest.fixture(scope="module")
def agent(world: World) -> dict[str, Any]:
    """The injected pod of an annotated agent Deployment, running (the flows below act on it)."""
    template = agent_pod(world, "agent")
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "agent", "namespace": world.namespace},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "agent"}},
                 "template": {"metadata": {k: template["metadata"][k] for k in ("labels", "annotations")},
                              "spec": template["spec"]}},
    }
    began = time.monotonic()
    pods.apply(world.cluster, deployment)

    def running_pod() -> str:
        out = world.kubectl("get", "pods", "-l", "app=agent", "-o", "jsonpath={.items[*].metadata.name}")
        names = out.split()
        return names[0] if len(names) == 1 and _agent_streamed(world, names[0]) else ""

    world.agent_pod = _wait("the agent Deployment's pod to run", running_pod, timeout=120)
    print(f"agent Deployment's pod Running with the stream done in {time.monotonic() - began:.1f}s")
    return pods.get(world.cluster, world.namespace, world.agent_pod)


# --- inject and call -----------------------------------------------------------------------


def test_the_sidecar_starts_first_and_the_agent_only_after_its_startup_probe(world: World, agent: dict[str, Any]) -> None:
    spec = agent["spec"]
    sidecar = next(c for c in spec["initContainers"] if c["name"] == contract.SIDECAR_CONTAINER_NAME)
    assert sidecar["restartPolicy"] == "Always" and sidecar["startupProbe"]["httpGet"]["path"] == contract.READY_PATH
    sidecar_log = _timestamps(world, world.agent_pod, contract.SIDECAR_CONTAINER_NAME)
    agent_log = _timestamps(world, world.agent_pod, "agent")
    status = agent["status"]
    side_started = status["initContainerStatuses"][0]["state"]["running"]["startedAt"]
    agent_started = status["containerStatuses"][0]["state"]["running"]["startedAt"]
    first_side, first_agent = sidecar_log[0][0], agent_log[0][0]
    print(f"sidecar startedAt {side_started}, first log {first_side.time()}; "
          f"agent startedAt {agent_started}, first log {first_agent.time()} "
          f"(+{(first_agent - first_side).total_seconds():.3f}s)")
    assert first_side < first_agent
    # The agent's very first call (no retries) succeeded: the sidecar was serving when it started.
    assert any("agent streamed: Hello from the upstream." in text for _t, text in agent_log)
    assert status["initContainerStatuses"][0]["started"] is True


def test_the_agent_streams_through_the_sidecar_and_the_upstream_sees_the_key(world: World, agent: dict[str, Any]) -> None:
    chat = [s for s in world.mock.seen if s.path == "/v1/chat/completions"]
    assert chat, world.mock.seen
    assert chat[0].key == "first"
    assert not chat[0].caller_token_seen  # the agent's token never reached the upstream


def test_no_log_of_the_pod_shows_the_key(world: World, agent: dict[str, Any]) -> None:
    for container in ("agent", contract.SIDECAR_CONTAINER_NAME):
        logs = world.kubectl("logs", world.agent_pod, "-c", container)
        assert logs.strip()
        for key in KEYS.values():
            assert key not in logs


def test_the_agent_container_holds_no_api_token_and_can_read_its_own(world: World, agent: dict[str, Any]) -> None:
    facts = world.exec_json(world.agent_pod, INSPECT)
    print(f"agent token file without fsGroup: {facts}")
    assert facts["api_token_dir"] is False
    # /var/run is a symlink to /run in a Debian rootfs; /proc/self/mounts shows the target
    assert facts["secret_mounts"] == [contract.AGENT_TOKEN_DIR.replace("/var/run/", "/run/")]
    assert facts["readable"] is True


def test_the_token_file_is_readable_by_the_agent_with_a_pod_fs_group(world: World, agent: dict[str, Any]) -> None:
    _running_pod(world, agent_pod(world, "agent-fsgroup", fs_group=4000))
    facts = world.exec_json("agent-fsgroup", INSPECT)
    print(f"agent token file with fsGroup 4000: {facts}")
    assert facts["readable"] is True
    assert facts["owner"][1] == 4000 and 4000 in facts["groups"]
    assert facts["api_token_dir"] is False


RESOLVE = r"""
import json, socket
def ip(name):
    try:
        return socket.gethostbyname(name)
    except OSError as exc:
        return type(exc).__name__
print(json.dumps({"service": ip("kubernetes.default.svc"), "outside": ip("pypi.org"),
                  "resolv": open("/etc/resolv.conf").read()}))
"""


def test_a_pod_resolves_service_names_and_nothing_outside(world: World, agent: dict[str, Any]) -> None:
    facts = world.exec_json(world.agent_pod, RESOLVE)
    print(f"pod DNS: {facts}")
    assert facts["service"] == "10.0.0.1"
    assert facts["outside"] == "gaierror"
    assert "nameserver 10.244.0.1" in facts["resolv"]


# --- refusals on a running pod ---------------------------------------------------------------


def test_a_forbidden_path_is_refused_by_the_sidecar(world: World, agent: dict[str, Any]) -> None:
    before = len(world.mock.seen)
    result = world.call(world.agent_pod, "POST", "/embeddings")
    assert result["status"] == 403, result
    assert len(world.mock.seen) == before  # nothing reached the upstream


def test_a_token_replayed_at_another_pods_sidecar_is_refused(world: World, agent: dict[str, Any]) -> None:
    _running_pod(world, agent_pod(world, "agent-fsgroup", fs_group=4000))  # idempotent if it runs
    stolen = world.kubectl("exec", world.agent_pod, "-c", "agent", "--", "cat", contract.AGENT_TOKEN_PATH).strip()
    assert world.call("agent-fsgroup", "GET", "/models")["status"] == 200
    replayed = world.call("agent-fsgroup", "GET", "/models", stolen)
    assert replayed["status"] == 401, replayed


def test_a_bare_pod_of_the_subject_account_is_refused_by_the_apiserver(world: World) -> None:
    bare = agent_pod(world, "bare")
    bare["metadata"]["annotations"] = {contract.ANNOTATION_INJECT: "false"}
    out = world.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(bare), check=False)
    assert "denied" in out or "forbidden" in out.lower(), out
    assert "sidekey" in out, out
    assert not world.kubectl("get", "pod", "bare", "--ignore-not-found", "-o", "name").strip()


# --- rotation and edits ------------------------------------------------------------------------


def test_a_rotated_secret_and_an_edited_policy_take_effect_without_a_restart(world: World, agent: dict[str, Any]) -> None:
    world.kubectl("patch", "secret", "openai-key", "--type=merge", "-p",
                  json.dumps({"stringData": {"api-key": KEYS["second"]}}))
    rotated = time.monotonic()

    def second_key_used() -> bool:
        result = world.call(world.agent_pod, "GET", "/models")
        return result["status"] == 200 and world.seen_keys()[-1] == "second"

    _wait("the sidecar to use the rotated key", second_key_used, timeout=120, every=1)
    print(f"rotated key in use after {time.monotonic() - rotated:.1f}s")

    edited = world.policy
    edited["spec"]["upstreams"][0]["allow"] = [{"methods": ["POST"], "paths": ["/chat/completions"]},
                                               {"methods": ["GET"], "paths": ["/slow"]}]
    pods.apply(world.cluster, edited)
    changed = time.monotonic()
    _wait("the sidecar to refuse the path the edit removed",
          lambda: world.call(world.agent_pod, "GET", "/models")["status"] == 403, timeout=120, every=1)
    print(f"policy edit in effect after {time.monotonic() - changed:.1f}s")
    status = pods.get(world.cluster, world.namespace, world.agent_pod)["status"]
    restarts = [c["restartCount"] for c in status["initContainerStatuses"] + status["containerStatuses"]]
    assert restarts == [0, 0]


# --- kubectl debug -------------------------------------------------------------------------------


PEEK = r"""
import glob
found = []
for path in ["/var/run/secrets/kubernetes.io/serviceaccount/token"] + glob.glob("/proc/*/root/var/run/secrets/kubernetes.io/serviceaccount/token"):
    try:
        found.append((path, len(open(path).read())))
    except OSError as exc:
        pass
print("peek:", found, flush=True)
"""


def test_kubectl_debug_cannot_target_the_sidecar_or_read_its_token(world: World, agent: dict[str, Any]) -> None:
    refused = world.kubectl("debug", world.agent_pod, f"--image={world.agent_image}", "--target",
                            contract.SIDECAR_CONTAINER_NAME, "-c", "dbg-sidecar", "--", "python", "-c", PEEK,
                            check=False)
    assert "sidekey" in refused and ("denied" in refused or "forbidden" in refused.lower()), refused

    world.kubectl("debug", world.agent_pod, f"--image={world.agent_image}", "--target", "agent",
                  "-c", "dbg", "--", "python", "-c", PEEK)

    def finished() -> dict[str, Any] | None:
        status = pods.get(world.cluster, world.namespace, world.agent_pod)["status"]
        for c in status.get("ephemeralContainerStatuses", []):
            if c["name"] == "dbg" and "terminated" in c["state"]:
                return dict(c["state"]["terminated"])
        return None

    terminated = _wait("the debug container to finish", finished, timeout=60)
    out = world.kubectl("logs", world.agent_pod, "-c", "dbg")
    print(f"debug container: {out.strip()} (exit {terminated['exitCode']})")
    assert out.strip() == "peek: []"


def test_an_ephemeral_container_cannot_mount_the_sidecars_api_token(world: World, agent: dict[str, Any]) -> None:
    """What ``kubectl debug`` cannot express, the API can: a debug container with the sidecar's volume."""
    import urllib.error

    path = f"/api/v1/namespaces/{world.namespace}/pods/{world.agent_pod}"
    pod = world.cluster.request("GET", path)
    pod["spec"].setdefault("ephemeralContainers", []).append({
        "name": "dbg-mount", "image": world.agent_image, "imagePullPolicy": "Never",
        "command": ["python", "-c", PEEK], "targetContainerName": "agent",
        "volumeMounts": [{"name": contract.API_TOKEN_VOLUME, "mountPath": "/stolen", "readOnly": True}]})
    with pytest.raises(urllib.error.HTTPError) as refused:
        world.cluster.request("PUT", path + "/ephemeralcontainers", pod)
    body = refused.value.read().decode()
    assert refused.value.code in (400, 403, 422), body
    assert "sidekey" in body and contract.API_TOKEN_VOLUME in body, body
    names = [c["name"] for c in world.cluster.request("GET", path)["spec"].get("ephemeralContainers", [])]
    assert "dbg-mount" not in names


# --- shutdown ----------------------------------------------------------------------------------------


def test_sigterm_lets_a_long_stream_finish_and_the_sidecar_stops_last(world: World) -> None:
    manifest = agent_pod(world, "drain", DRAIN_MAIN)
    pods.apply(world.cluster, manifest)
    _wait("the long stream to open", lambda: "drain stream open 200" in world.kubectl(
        "logs", "drain", "-c", "agent", check=False), timeout=90, every=0.3)
    follow = subprocess.Popen(
        [str(world.cluster.bin_dir / "kubectl"), f"--kubeconfig={world.cluster.kubeconfig}", "-n", world.namespace,
         "logs", "-f", "--timestamps", "drain", "-c", "agent"], stdout=subprocess.PIPE, text=True)
    sidecar_follow = subprocess.Popen(
        [str(world.cluster.bin_dir / "kubectl"), f"--kubeconfig={world.cluster.kubeconfig}", "-n", world.namespace,
         "logs", "-f", "--timestamps", "drain", "-c", contract.SIDECAR_CONTAINER_NAME],
        stdout=subprocess.PIPE, text=True)
    states: list[tuple[int, str, str]] = []  # (poll number, container, state)
    done = threading.Event()

    def watch() -> None:
        polls = 0
        while not done.is_set():
            polls += 1
            try:
                status = pods.get(world.cluster, world.namespace, "drain").get("status", {})
            except OSError:
                return  # deleted
            for c in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
                states.append((polls, c["name"], next(iter(c["state"]))))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    deleted = time.monotonic()
    world.kubectl("delete", "pod", "drain", "--wait=false")
    agent_out, _ = follow.communicate(timeout=60)
    sidecar_out, _ = sidecar_follow.communicate(timeout=60)
    _wait("the pod to be gone", lambda: not world.kubectl("get", "pod", "drain", "--ignore-not-found",
                                                          "-o", "name").strip(), timeout=60)
    gone = time.monotonic() - deleted
    done.set()
    watcher.join(5)
    agent_last = agent_out.strip().splitlines()[-1]
    sidecar_last = sidecar_out.strip().splitlines()[-1]
    print(f"agent: {agent_last}; pod gone {gone:.1f}s after delete")
    print("sidecar's last lines:", sidecar_out.strip().splitlines()[-3:])
    line = agent_last.split(" ", 1)[1]
    assert line.startswith("drain done events=40 "), agent_out
    fields = dict(kv.split("=") for kv in line.split()[2:])
    assert fields["sigterm_at"] != "None" and float(fields["sigterm_at"]) < float(fields["finished_at"])
    assert gone < 30  # within the default grace period

    def first_poll(container: str, state: str) -> int | None:
        return min((n for n, name, st in states if name == container and st == state), default=None)

    agent_stopped = first_poll("agent", "terminated")
    sidecar_stopped = first_poll(contract.SIDECAR_CONTAINER_NAME, "terminated")
    print(f"status polls: agent terminated first seen in poll {agent_stopped}, sidecar in poll {sidecar_stopped}")
    assert agent_stopped is not None
    assert sidecar_stopped is None or sidecar_stopped >= agent_stopped
    # The sidecar's last words come after the agent's: it stopped last.
    assert sidecar_last.split(" ", 1)[0] > agent_last.split(" ", 1)[0], (agent_last, sidecar_last)
