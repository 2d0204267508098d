"""``sidekey demo`` on a real node: the agent is a pod, and nothing plays the kubelet.

The steps are the pod-less demo's (demo/main.py), but every part runs as in a
cluster: a node on this machine (localcluster/node.py: containerd, runc,
kubelet, kube-proxy, kube-scheduler), the project's image built from Debian
packages and the lock (localcluster/image.py), the chart installed with helm,
the webhook reached through its Service, the kubelet writing the projected
tokens and starting the native sidecar before the agent. The agent's calls
run inside its container (``kubectl exec``), with the same ``demo/agent.py``
and the real ``openai`` SDK the test agent image holds.

It needs root and cgroups; where the node cannot start, ``sidekey demo``
says why and runs the pod-less path instead.
"""

from __future__ import annotations

import datetime
import json
import time
from typing import Any

import yaml

from sidekey.core import contract
from sidekey.demo import main
from sidekey.localcluster import helm, image, node

# Run inside the agent container: one call of demo/agent.py, the result as JSON.
IN_POD = "import json, os, sys; from sidekey.demo import agent; print(json.dumps(getattr(agent, sys.argv[1])(os.environ, *sys.argv[2:])))"
RAW_CALL = ("import json, sys; from sidekey.demo import agent; "
            "print(json.dumps(agent.raw_call(int(sys.argv[1]), sys.argv[2])))")
METRICS = ("import urllib.request; print(urllib.request.urlopen("
           f"'http://127.0.0.1:{contract.DEFAULT_HEALTH_PORT}/metrics', timeout=5).read().decode())")
# The agent's main process idles until SIGTERM, which it handles (Python as PID 1 ignores it otherwise).
IDLE = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); print('agent up', flush=True); time.sleep(1e9)"


class NodeDemo(main.Demo):
    upstream_host = node.GATEWAY  # what pods reach: the bridge, not the host's loopback
    sidekey_image: image.Image
    agent_image: image.Image

    # --- helpers -------------------------------------------------------------

    def in_pod(self, pod: str, *argv: str) -> Any:
        out = self.kubectl("exec", "-n", main.DEMO_NS, pod, "-c", "agent", "--", "python", "-c", *argv)
        return json.loads(out.strip().splitlines()[-1])

    def _wait_running(self, name: str) -> None:
        def running() -> bool:
            status = self.cluster.request("GET", f"/api/v1/namespaces/{main.DEMO_NS}/pods/{name}").get("status", {})
            return any(c.get("state", {}).get("running") for c in status.get("containerStatuses", []))
        main._wait(f"pod {name} to run", running, timeout=120, interval=0.2)

    # --- the steps -------------------------------------------------------------

    def start_control_plane(self) -> None:
        self.out.step("Start a real node: a bridge, containerd, the control plane, kubelet, kube-proxy, kube-scheduler")
        self.cluster = cluster = node.NodeCluster(progress=True)
        cluster.start()
        self.stack.callback(cluster.stop)
        self.kube_version = version = cluster.request("GET", "/version")["gitVersion"]
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in cluster.timings.items())
        self.out.ok(f"Kubernetes {version} on {cluster.url}; node {cluster.node_name} Ready and untainted "
                    f"in {cluster.started_in:.1f}s ({steps})")
        began = time.monotonic()
        try:  # into dist/, as hack/image writes them; layers are cached, so a rerun takes seconds
            self.sidekey_image = image.build_sidekey(image.default_output())
            self.agent_image = image.build_agent(image.default_output())
        except image.ImageError as exc:
            raise main.DemoFailed(str(exc)) from None
        for built in (self.sidekey_image, self.agent_image):
            cluster.import_image(built.archive)
        self.out.ok(f"images {self.sidekey_image.name} and {self.agent_image.name} built from Debian packages "
                    f"and the locks and imported in {time.monotonic() - began:.1f}s (nothing is pulled)")

    def install_sidekey(self) -> None:
        self.out.step("Install sidekey with helm: the CRD, the guards, the operator and the webhook as pods")
        repository, _sep, tag = self.sidekey_image.name.rpartition(":")
        began = time.monotonic()
        try:
            helm.run("install", helm.RELEASE, str(helm.CHART), "--namespace", main.SYSTEM_NS, "--create-namespace",
                     "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
                     "--wait", "--timeout", "240s", env=self.cluster.env(), timeout=300)
        except helm.HelmFailed as exc:
            raise main.DemoFailed(str(exc)) from None

        def ca_written() -> bool:
            mwc = self.cluster.request("GET", "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"
                                       + helm.RELEASE)
            return all(w.get("clientConfig", {}).get("caBundle") for w in mwc["webhooks"])

        main._wait("the operator to write the webhook's CA", ca_written, timeout=60, interval=0.2)
        self.out.ok(f"helm install {helm.RELEASE} charts/sidekey: operator and webhook Ready, the webhook's "
                    f"certificate issued by the operator, in {time.monotonic() - began:.1f}s")
        self.out.say(self.kubectl("get", "deployments,services", "-n", main.SYSTEM_NS).rstrip())

    def agent_manifest(self, name: str) -> dict[str, Any]:
        pod = super().agent_manifest(name)
        pod["metadata"]["annotations"].pop(contract.ANNOTATION_PORT, None)  # a pod has its own loopback
        pod["spec"]["containers"][0].update(image=self.agent_image.name, imagePullPolicy="Never",
                                            command=["python", "-c", IDLE])
        return pod

    def play_kubelet(self, pod: dict[str, Any]) -> None:
        self.out.step("The kubelet runs the pod: the sidecar first, the agent once its startup probe passes")
        began = time.monotonic()
        self._wait_running("agent")
        firsts = {}
        for container in (contract.SIDECAR_CONTAINER_NAME, "agent"):
            stamp = self.kubectl("logs", "-n", main.DEMO_NS, "agent", "-c", container, "--timestamps").split(" ", 1)[0]
            firsts[container] = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        lead = (firsts["agent"] - firsts[contract.SIDECAR_CONTAINER_NAME]).total_seconds()
        if lead <= 0:
            raise main.DemoFailed("the agent started before the sidecar")
        self.out.ok(f"pod Running {time.monotonic() - began:.1f}s after create; the sidecar's first line "
                    f"{lead:.2f}s before the agent's")
        facts = self.in_pod("agent", "import json, os, stat; s = os.stat(os.environ['SIDEKEY_TOKEN_FILE']); "
                            "print(json.dumps([oct(stat.S_IMODE(s.st_mode)), s.st_uid, s.st_gid, os.getuid(), "
                            "os.path.exists('/var/run/secrets/kubernetes.io/serviceaccount')]))")
        self.out.ok(f"the kubelet wrote the agent's token file {contract.AGENT_TOKEN_PATH} (mode {facts[0]}, "
                    f"owner {facts[1]}:{facts[2]}, the agent runs as UID {facts[3]}); "
                    f"API token in the agent container: {'yes' if facts[4] else 'none'}")
        if facts[4]:
            raise main.DemoFailed("the agent container holds an API token")

    def call_through_sidecar(self) -> None:
        self.out.step("The agent calls OpenAI through the sidecar with the real openai SDK, streaming")
        text = self.in_pod("agent", IN_POD, "stream_chat")
        self.out.say(f"in the agent container: agent.stream_chat() streamed: {text}")
        last = self.mock.seen[-1]
        if last.key != "first" or last.caller_token_seen:
            raise main.DemoFailed(f"the upstream did not get the key, or got the agent's token: {last}")
        self.out.ok("the upstream received the real key; the agent's token never left the pod")
        env = self.kubectl("exec", "-n", main.DEMO_NS, "agent", "-c", "agent", "--", "env")
        logs = self.kubectl("logs", "-n", main.DEMO_NS, "agent", "-c", "agent")
        if any(k in env + logs for k in self.keys.values()):
            raise main.DemoFailed("the agent's env or logs hold the key")
        self.out.ok("the agent's env and logs hold no key")

    def refusals(self, pod: dict[str, Any]) -> None:
        self.out.step("Four refusals")
        status, message = self.in_pod("agent", IN_POD, "forbidden_call")
        main._expect(status, 403, "a call the policy forbids")
        self.out.refused(f"403 POST /embeddings (not in the policy): {message}")

        self.kubectl("create", "-f", "-", input=yaml.safe_dump(self.agent_manifest("agent-2")))
        self._wait_running("agent-2")
        token = self.kubectl("exec", "-n", main.DEMO_NS, "agent", "-c", "agent", "--",
                             "cat", contract.AGENT_TOKEN_PATH).strip()
        status, message = self.in_pod("agent-2", RAW_CALL, str(contract.DEFAULT_PROXY_PORT), token)
        main._expect(status, 401, "a token replayed from another pod")
        self.out.refused(f"401 pod agent's token replayed at pod agent-2's sidecar: {message}")

        foreign = self.cluster.token(main.DEMO_NS, "agent", audience="someone-else", pod_name="agent",
                                     pod_uid=pod["metadata"]["uid"])
        status, message = self.in_pod("agent", RAW_CALL, str(contract.DEFAULT_PROXY_PORT), foreign)
        main._expect(status, 401, "a token for another audience")
        self.out.refused(f"401 a token minted for another audience: {message}")
        self.bare_pod_refused()

    def rotate(self) -> None:
        self.out.step("Rotate the key in the Secret; the running sidecar uses the new one, no restart")
        patch = json.dumps({"stringData": {"api-key": self.keys["rotated"]}})
        began = time.monotonic()
        self.kubectl("patch", "secret", "openai-key", "-n", main.DEMO_NS, "--type=merge", "-p", patch)

        def rotated() -> bool:
            self.in_pod("agent", IN_POD, "list_models")
            return self.mock.seen[-1].key == "rotated"

        main._wait("the rotated key to reach the upstream", rotated, timeout=30, interval=0.2)
        restarts = self.kubectl("get", "pod", "agent", "-n", main.DEMO_NS, "-o",
                                "jsonpath={.status.initContainerStatuses[0].restartCount}")
        self.out.ok(f"the next call carried the rotated key {time.monotonic() - began:.1f}s after the change "
                    f"(sidecar restarts: {restarts})")

    # --- the agent and the sidecar in the pod (the budget step is main.Demo's) ------

    agent_place = "in the agent container, "

    def agent_does(self, call: str, *args: str) -> Any:
        return self.in_pod("agent", IN_POD, call, *args)

    def sidecar_base(self, upstream: str) -> str:
        return f"http://127.0.0.1:{contract.DEFAULT_PROXY_PORT}/{upstream}"

    def sidecar_log_lines(self) -> list[str]:
        return self._sidecar_log().splitlines()

    def sidecar_metrics(self) -> str:
        return self.kubectl("exec", "-n", main.DEMO_NS, "agent", "-c", "agent", "--", "python", "-c", METRICS)

    def _sidecar_log(self) -> str:
        return self.kubectl("logs", "-n", main.DEMO_NS, "agent", "-c", contract.SIDECAR_CONTAINER_NAME)

    def observe(self) -> None:
        self.out.step("What operators see: audit lines and metrics (never a key or token)")
        sidecar_log = self._sidecar_log()
        for line in [x for x in sidecar_log.splitlines() if '"request_id"' in x][-4:]:
            self.out.say(line[:260])
        metrics = self.sidecar_metrics()
        for line in metrics.splitlines():
            if line.startswith("sidekey_requests_total{"):
                self.out.say(line)
        everything = metrics + sidecar_log
        for ns in (main.DEMO_NS, main.SYSTEM_NS):
            for name in self.kubectl("get", "pods", "-n", ns, "-o", "name").split():
                everything += self.kubectl("logs", "-n", ns, name, "--all-containers", check=False)
        for key in self.keys.values():
            if key in everything:
                raise main.DemoFailed("a key appears in a log line or a metric")
        self.out.ok("no key in any log line or metric (every pod's log, the sidecar's metrics)")

    def try_it(self) -> str:
        return (f"  export KUBECONFIG={self.cluster.kubeconfig}\n"
                f"  kubectl get agentpolicies,pods -n {main.DEMO_NS}\n"
                f"  kubectl exec -n {main.DEMO_NS} agent -c agent -- python -c "
                f"\"import os; from sidekey.demo import agent; print(agent.stream_chat(os.environ))\"\n")
