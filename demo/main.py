"""``sidekey demo``: the whole promise, on an embedded control plane, in about a minute.

The demo drives every part the way a cluster would: the operator and webhook
run as local processes registered with a real kube-apiserver, the chart's own
admission guards are applied, and the demo plays the kubelet (it mints the
pod-bound tokens with TokenRequest and starts the sidecar exactly as the
injected spec says). The agent is the real ``openai`` SDK.

Nothing here imports a component: each runs as ``sidekey <part>``, as in a pod.

This is the pod-less path. Where a real node can run (root, cgroups),
``sidekey demo`` runs the same steps with ``demo/onnode.py``: the agent is a
pod and nothing plays the kubelet; ``--pod-less`` asks for this path.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import signal
import ssl
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml

from sidekey.core import certificates, contract
from sidekey.demo import agent
from sidekey.localcluster import binaries, helm, node, podplayer, upstreams
from sidekey.localcluster.cluster import ControlPlaneError, LocalCluster, free_port
from sidekey.localcluster.processes import Processes

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "crds"
SYSTEM_NS = helm.NAMESPACE
DEMO_NS = "demo"
SIDECAR_IMAGE = "ghcr.io/sidekey/sidekey:0.1.0"
FAKE_POD_IP = "10.244.0.17"


class DemoFailed(RuntimeError):
    """A step did not show what it should; the message says which."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", action="store_true",
                        help="leave everything running at the end; print the kubeconfig and a curl to try")
    parser.add_argument("--record", type=Path, default=None,
                        help="append what the mock upstream received (JSON lines, never the key) to this file")
    parser.add_argument("--workdir", type=Path, default=None, help="where to keep files (default: a temp dir)")
    parser.add_argument("--pod-less", action="store_true",
                        help="skip the real node: the demo plays the kubelet (the path where a node cannot run)")


class Output:
    """Step-by-step output for a person watching."""

    def __init__(self) -> None:
        self.n = 0

    def step(self, title: str) -> None:
        self.n += 1
        print(f"\n\033[1m[{self.n}] {title}\033[0m", flush=True)

    def say(self, text: str = "") -> None:
        for line in text.splitlines() or [""]:
            print(f"    {line}", flush=True)

    def ok(self, text: str) -> None:
        print(f"    \033[32m✓\033[0m {text}", flush=True)

    def refused(self, text: str) -> None:
        print(f"    \033[33m✗ refused\033[0m {text}", flush=True)


def _wait(what: str, probe: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(interval)
    raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}")


def _https_ok(url: str, ca_file: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:  # noqa: S310
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback only
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (OSError, urllib.error.URLError):
        return 0, ""


class Demo:
    upstream_host = "127.0.0.1"  # where the mock upstream listens (a node's pods reach the bridge)

    def __init__(self, args: argparse.Namespace, out: Output, stack: ExitStack) -> None:
        self.args = args
        self.out = out
        self.stack = stack
        self.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sidekey-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs = stack.enter_context(Processes(self.workdir / "logs"))
        self.cluster: LocalCluster
        self.keys = {"first": f"sk-demo-FAKE-{secrets.token_hex(12)}",
                     "rotated": f"sk-demo-FAKE-{secrets.token_hex(12)}"}
        self.mock = upstreams.MockLLM(self.keys, record_file=args.record,
                                      reply="Hello from the upstream; your call carried the key.")

    # --- helpers -------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.cluster.kubectl(*args, input=input, check=check)

    def apply(self, *manifests: Mapping[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(list(manifests)))

    def helm_template(self, *show_only: str, values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        try:
            return helm.template(values, show_only=show_only, namespace=SYSTEM_NS, kube_version=self.kube_version)
        except helm.HelmFailed as exc:
            raise DemoFailed(str(exc)) from None

    # --- the steps -------------------------------------------------------------

    def start_control_plane(self) -> None:
        self.out.step("Start a local control plane: etcd, kube-apiserver, kube-controller-manager")
        try:
            found = binaries.find(build=False)
        except binaries.BinariesUnavailable:
            self.out.say("first run: building the binaries with Go (10-25 minutes on two cores)...")
            found = binaries.find(build=True, progress=True)
        os.environ["KUBEBUILDER_ASSETS"] = str(found.directory)
        self.cluster = LocalCluster(workdir=self.workdir / "cluster", keep_workdir=True)
        self.cluster.start()
        self.stack.callback(self.cluster.stop)
        self.kube_version = version = self.cluster.request("GET", "/version")["gitVersion"]
        self.out.ok(f"Kubernetes {version} on {self.cluster.url}, ready in {self.cluster.started_in:.1f}s")

    def install_sidekey(self) -> None:
        self.out.step("Install sidekey: the CRD, the admission guards, the operator and the webhook")
        for f in sorted(CRDS.glob("*.yaml")):
            self.kubectl("apply", "--server-side", "-f", str(f))
        self.cluster.wait_established("agentpolicies.sidekey.io")
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NS}})
        self.out.ok("CRD agentpolicies.sidekey.io established")

        guards = self.helm_template("templates/guard-bypass.yaml", "templates/guard-escalation.yaml",
                                    values={"sidecar": {"imageAllowList": [SIDECAR_IMAGE]}})
        self.apply(*guards)
        self.out.ok(f"{len(guards)} ValidatingAdmissionPolicy objects from the chart")

        ca = certificates.make_ca("sidekey-demo-webhook-ca")
        serving = certificates.issue(ca, "sidekey-webhook", ip_addresses=["127.0.0.1"], dns_names=["localhost"])
        tls = self.workdir / "webhook-tls"
        tls.mkdir(exist_ok=True)
        (tls / contract.TLS_CERT_KEY).write_bytes(serving.cert_pem)
        (tls / contract.TLS_KEY_KEY).write_bytes(serving.key_pem)
        (tls / contract.TLS_CA_KEY).write_bytes(ca.cert_pem)
        settings = self.workdir / "webhook-settings.yaml"
        settings.write_text(yaml.safe_dump({"image": SIDECAR_IMAGE, "imageAllowList": [SIDECAR_IMAGE]}))

        env = self.cluster.env()
        self.procs.start("operator", [sys.executable, "-m", "sidekey", "operator", "--namespace", SYSTEM_NS,
                                      "--certificates", "external", "--kubeconfig", str(self.cluster.kubeconfig),
                                      "--health-port", str(free_port()), "--metrics-port", str(free_port()),
                                      "--sidecar-image", SIDECAR_IMAGE], env=env)
        port = free_port()
        self.procs.start("webhook", [sys.executable, "-m", "sidekey", "webhook", "--host", "127.0.0.1", "--port", str(port),
                                     "--tls-dir", str(tls), "--settings", str(settings),
                                     "--namespace", SYSTEM_NS, "--kubeconfig", str(self.cluster.kubeconfig)],
                         env=env)
        _wait("the webhook's /readyz", lambda: self.procs.alive() and _https_ok(
            f"https://127.0.0.1:{port}/readyz", tls / contract.TLS_CA_KEY))
        # nothing routes a Service here, so the chart's configuration points the apiserver at the process
        mwc = helm.local_webhook_configuration(f"https://127.0.0.1:{port}", ca.cert_pem,
                                               kube_version=self.kube_version)
        self.apply(mwc)
        self.out.ok(f"operator running; webhook serving https://127.0.0.1:{port}, registered "
                    f"({len(mwc['webhooks'])} entries, failurePolicy Fail, matchConditions for opted-in pods)")

    def create_policy(self) -> None:
        self.out.step("A team's namespace, its key in a Secret, and an AgentPolicy for 'openai'")
        self.mock.start(host=self.upstream_host)
        self.stack.callback(self.mock.stop)
        self.out.ok(f"mock OpenAI API on {self.mock.url} (real TLS, checks the key)")
        self.apply(
            {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": DEMO_NS, "labels": {contract.LABEL_INJECT: contract.LABEL_INJECT_ENABLED}}},
        )
        _wait("the default ServiceAccount", lambda: bool(self.kubectl(
            "get", "sa", "default", "-n", DEMO_NS, "--ignore-not-found", "-o", "name").strip()))
        self.policy = {
            "apiVersion": contract.API_VERSION, "kind": contract.KIND,
            "metadata": {"name": "openai", "namespace": DEMO_NS},
            "spec": {
                "subjects": {"serviceAccounts": ["agent"]},
                "upstreams": [{
                    "name": "openai",
                    "url": self.mock.url,
                    "caBundle": self.mock.ca_pem,
                    "auth": {"type": "bearer", "secretRef": {"name": "openai-key", "key": "api-key"}},
                    "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]},
                              {"methods": ["GET"], "paths": ["/models"]}],
                    "limits": {"requestsPerMinute": 600},
                    "env": [{"name": "OPENAI_BASE_URL"}],
                }],
            },
        }
        self.apply(
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "agent", "namespace": DEMO_NS}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "openai-key", "namespace": DEMO_NS},
             "stringData": {"api-key": self.keys["first"]}},
            self.policy,
        )
        began = time.monotonic()
        self.kubectl("wait", "--for=condition=Ready", "--timeout=60s", "-n", DEMO_NS, "agentpolicy/openai")
        self.out.ok(f"Secret openai-key holds a fake key ({_masked(self.keys['first'])})")
        self.out.ok(f"AgentPolicy openai is Ready after {time.monotonic() - began:.1f}s "
                    "(the operator resolved the Secret and granted the agent's account a Role on it alone)")
        self.out.say(self.kubectl("get", "agentpolicies", "-n", DEMO_NS).rstrip())

    def create_agent_pod(self) -> dict[str, Any]:
        self.out.step("Create an annotated agent pod; the webhook injects the sidecar")
        pod = self.agent_manifest("agent")
        stored: dict[str, Any] = json.loads(self.kubectl(
            "create", "-o", "json", "-f", "-", input=yaml.safe_dump(pod)))
        sidecar = next(c for c in stored["spec"].get("initContainers", [])
                       if c["name"] == contract.SIDECAR_CONTAINER_NAME)
        agent_c = stored["spec"]["containers"][0]
        self.out.say(f"sidecar: init container {sidecar['name']!r}, image {sidecar['image']}, "
                     f"restartPolicy {sidecar.get('restartPolicy')}, runs as UID "
                     f"{sidecar.get('securityContext', {}).get('runAsUser')}")
        vols = {v["name"]: v for v in stored["spec"]["volumes"]}
        token_src = vols[contract.AGENT_TOKEN_VOLUME]["projected"]["sources"][0]["serviceAccountToken"]
        self.out.say(f"agent token volume: audience {token_src['audience']!r}, "
                     f"expirationSeconds {token_src['expirationSeconds']}, "
                     f"mounted read-only at {contract.AGENT_TOKEN_DIR}")
        self.out.say("agent env: " + ", ".join(
            f"{e['name']}={e.get('value', '<downward API>')}" for e in agent_c.get("env", [])))
        text = json.dumps(stored)
        for key in self.keys.values():
            if key in text or base64.b64encode(key.encode()).decode() in text:
                raise DemoFailed("the key appears in the stored pod spec")
        leaked = [m["name"] for c in stored["spec"]["containers"] for m in c.get("volumeMounts", [])
                  if m["name"].startswith(contract.KUBE_API_ACCESS_PREFIX) or m["name"] == contract.API_TOKEN_VOLUME]
        if leaked:
            raise DemoFailed(f"an agent container mounts an API token: {leaked}")
        self.out.ok("no key anywhere in the pod spec, and no API token mounted in the agent container")
        return stored

    def agent_manifest(self, name: str) -> dict[str, Any]:
        return agent.pod(name, DEMO_NS, "agent", free_port())

    def start_pod(self, pod: dict[str, Any], name: str) -> podplayer.PlayedPod:
        return podplayer.play(self.cluster, pod, self.procs, self.workdir / name, name=name, ip=FAKE_POD_IP)

    def play_kubelet(self, pod: dict[str, Any]) -> None:
        self.out.step("Play the kubelet: mint the pod-bound tokens and start the sidecar as the spec says")
        began = time.monotonic()
        self.pod = self.start_pod(pod, "sidecar")
        self.sidecar = self.pod.sidecar
        self.out.ok(f"sidecar ready in {time.monotonic() - began:.2f}s on 127.0.0.1:{self.sidecar.port} "
                    f"(agent token file {self.pod.agent_token_file})")
        self.agent_env = self.pod.agent_env

    def call_through_sidecar(self) -> None:
        self.out.step("The agent calls OpenAI through the sidecar with the real openai SDK, streaming")
        self.out.say(f"OPENAI_BASE_URL={self.agent_env['OPENAI_BASE_URL']}; api_key = the token file, read per request")
        text = agent.stream_chat(self.agent_env)
        self.out.say(f"streamed: {text}")
        last = self.mock.seen[-1]
        if last.key != "first" or last.caller_token_seen:
            raise DemoFailed(f"the upstream did not get the key, or got the agent's token: {last}")
        self.out.ok("the upstream received the real key; the agent's token never left the pod")
        agent_view = json.dumps(self.agent_env) + self.pod.agent_token_file.read_text()
        if any(k in agent_view for k in self.keys.values()):
            raise DemoFailed("the agent's env or token file holds the key")
        self.out.ok("the agent's env and files hold no key")

    def refusals(self, pod: dict[str, Any]) -> None:
        self.out.step("Four refusals")
        status, message = agent.forbidden_call(self.agent_env)
        _expect(status, 403, "a call the policy forbids")
        self.out.refused(f"403 POST /embeddings (not in the policy): {message}")

        other = json.loads(self.kubectl("create", "-o", "json", "-f", "-", input=yaml.safe_dump(
            agent.pod("agent-2", DEMO_NS, "agent", free_port()))))
        sidecar2 = self.start_pod(other, "sidecar-2").sidecar
        status, message = agent.raw_call(sidecar2.port, self.pod.agent_token_file.read_text())
        _expect(status, 401, "a token replayed from another pod")
        self.out.refused(f"401 pod agent's token replayed at pod agent-2's sidecar: {message}")

        foreign = self.cluster.token(DEMO_NS, "agent", audience="someone-else", pod_name="agent",
                                     pod_uid=pod["metadata"]["uid"])
        status, message = agent.raw_call(self.sidecar.port, foreign)
        _expect(status, 401, "a token for another audience")
        self.out.refused(f"401 a token minted for another audience: {message}")
        self.bare_pod_refused()

    def bare_pod_refused(self) -> None:
        bare = agent.pod("bare", DEMO_NS, "agent", None)
        bare["metadata"]["annotations"] = {contract.ANNOTATION_INJECT: "false"}
        result = self.kubectl("create", "-f", "-", input=yaml.safe_dump(bare), check=False)
        if "denied" not in result and "forbidden" not in result.lower():
            raise DemoFailed(f"a pod without the sidecar was admitted: {result}")
        self.out.refused("by the apiserver, a pod that runs as 'agent' without the sidecar:\n      "
                         + result.strip().splitlines()[-1].split("denied request: ")[-1][:400])

    def rotate(self) -> None:
        self.out.step("Rotate the key in the Secret; the running sidecar uses the new one, no restart")
        patch = json.dumps({"stringData": {"api-key": self.keys["rotated"]}})
        began = time.monotonic()
        self.kubectl("patch", "secret", "openai-key", "-n", DEMO_NS, "--type=merge", "-p", patch)

        def rotated() -> bool:
            agent.list_models(self.agent_env)
            return self.mock.seen[-1].key == "rotated"

        _wait("the rotated key to reach the upstream", rotated, timeout=10, interval=0.2)
        self.out.ok(f"the next call carried the rotated key {time.monotonic() - began:.1f}s after the change")

    # --- where the agent and the sidecar live (demo/onnode.py runs them in a pod) ----

    agent_place = ""  # how the output names where the agent's calls run

    def agent_does(self, call: str, *args: str) -> Any:
        """One call of demo/agent.py as the agent makes it."""
        return getattr(agent, call)(self.agent_env, *args)

    def sidecar_base(self, upstream: str) -> str:
        return f"http://127.0.0.1:{self.sidecar.port}/{upstream}"

    def sidecar_log_lines(self) -> list[str]:
        return self.procs.get("sidecar").lines()

    def sidecar_metrics(self) -> str:
        status, metrics = _http_get(f"http://127.0.0.1:{self.sidecar.health_port}/metrics")
        return metrics if status == 200 else ""

    def budget(self) -> None:
        self.out.step("A token budget runs out mid-stream; the SDK gets a clean error, not a torn stream")
        base = self.sidecar_base("openai-budget")

        def with_budget(tokens: int) -> dict[str, Any]:
            policy: dict[str, Any] = json.loads(json.dumps(self.policy))
            up = {k: v for k, v in policy["spec"]["upstreams"][0].items() if k != "env"}
            up.update(name="openai-budget", api="openai", models=["demo-model"], capMaxTokens=False,
                      budgets=[{"tokens": tokens, "window": "24h", "scope": "pod"}])
            policy["spec"]["upstreams"].append(up)
            return policy

        self.apply(with_budget(100_000))
        _wait("the sidecar to route openai-budget",
              lambda: bool(self.agent_does("stream_until_the_budget", base)[0]), timeout=60, interval=0.3)

        audited: list[dict[str, Any]] = []

        def measured() -> bool:
            audited[:] = [json.loads(line) for line in self.sidecar_log_lines()
                          if '"openai-budget"' in line and '"tokens"' in line]
            return bool(audited)

        _wait("the audit line of that call", measured, timeout=30, interval=0.3)
        line = audited[-1]
        spent = sum(v for k, v in line["tokens"].items() if k != "estimated")
        # leave room for the next prompt (its size in bytes, the sidecar's estimate) and 8 bytes of reply
        room = spent + int(line["bytes_in"]) + 8
        reloads = self._policy_reloads()
        self.apply(with_budget(room))
        _wait("the sidecar to load the smaller budget", lambda: self._policy_reloads() > reloads,
              timeout=30, interval=0.3)
        self.out.say(f"upstream openai-budget: capMaxTokens false, a pod budget of {room} tokens "
                     f"({spent} spent by a first call, the next prompt, and 8 more)")
        text, error = self.agent_does("stream_until_the_budget", base)
        if "token budget" not in error or not text:
            raise DemoFailed(f"the stream was not ended at the budget: text {text!r}, error {error!r}")
        self.out.say(f"{self.agent_place}streamed before the budget ran out: {text!r}")
        self.out.refused(f"the openai SDK raised APIError: {error[:300]}")
        self.out.ok("the stream ended cleanly in OpenAI's own shape (an error event, then [DONE]); "
                    "the sidecar closed the upstream connection, so the provider stops generating")

    def _policy_reloads(self) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in self.sidecar_metrics().splitlines()
                   if line.startswith("sidekey_policy_reloads_total{"))

    def observe(self) -> None:
        self.out.step("What operators see: audit lines and metrics (never a key or token)")
        audit = [line for line in self.procs.get("sidecar").lines() if '"request_id"' in line]
        for line in audit[-4:]:
            self.out.say(line[:260])
        status, metrics = _http_get(f"http://127.0.0.1:{self.sidecar.health_port}/metrics")
        _expect(status, 200, "the sidecar's metrics")
        for line in metrics.splitlines():
            if line.startswith("sidekey_requests_total{"):
                self.out.say(line)
        everything = metrics + "\n".join(self.procs.all_output())
        for key in self.keys.values():
            if key in everything:
                raise DemoFailed("a key appears in a log line or a metric")
        self.out.ok("no key in any log line or metric")

    def try_it(self) -> str:
        return (f"  export KUBECONFIG={self.cluster.kubeconfig}\n"
                f"  kubectl get agentpolicies,pods -n {DEMO_NS}\n"
                f"  curl -s -H \"Authorization: Bearer $(cat {self.pod.agent_token_file})\" "
                f"http://127.0.0.1:{self.sidecar.port}/openai/models\n")


def _expect(status: int, wanted: int, what: str) -> None:
    if status != wanted:
        raise DemoFailed(f"{what}: expected {wanted}, got {status}")


def _masked(key: str) -> str:
    return f"{key[:12]}…{key[-4:]}"


@contextmanager
def _signals_stop() -> Iterator[threading.Event]:
    """Ctrl-C and SIGTERM end the demo through the normal cleanup path."""
    stopped = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stopped.set()
        raise KeyboardInterrupt

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopped
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _choose(args: argparse.Namespace, out: Output, stack: ExitStack) -> Demo:
    """The agent as a real pod on a real node when this machine can run one; else the pod-less path."""
    from sidekey.demo import onnode  # it builds on Demo

    problems = node.preflight()
    if args.pod_less or problems:
        if problems:
            print("a real node cannot run here (" + "; ".join(problems) + "): the pod-less path, "
                  "where the demo plays the kubelet", file=sys.stderr)
        return Demo(args, out, stack)
    return onnode.NodeDemo(args, out, stack)


def run(args: argparse.Namespace) -> int:
    out = Output()
    began = time.monotonic()
    with _signals_stop(), ExitStack() as stack:
        demo = _choose(args, out, stack)
        try:
            try:
                demo.start_control_plane()
            except node.NodeUnavailable as exc:  # e.g. another node holds this machine
                out.say(f"the node did not start ({exc}); running the pod-less path instead")
                demo = Demo(args, out, stack)
                demo.start_control_plane()
            demo.install_sidekey()
            demo.create_policy()
            pod = demo.create_agent_pod()
            demo.play_kubelet(pod)
            demo.call_through_sidecar()
            demo.refusals(pod)
            demo.rotate()
            demo.budget()
            demo.observe()
        except (DemoFailed, ControlPlaneError, binaries.BinariesUnavailable, node.NodeUnavailable) as exc:
            print(f"\n\033[31mdemo failed:\033[0m {exc}", file=sys.stderr)
            print(f"logs: {demo.workdir}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; stopping everything", file=sys.stderr)
            return 130
        print(f"\n\033[1mDone in {time.monotonic() - began:.0f}s.\033[0m The agent never held a key; "
              "its token was worthless outside its pod.")
        if args.keep:
            print(f"\nEverything is still running. Try:\n{demo.try_it()}Ctrl-C stops it all.")
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                print("\nstopping everything", file=sys.stderr)
    return 0
