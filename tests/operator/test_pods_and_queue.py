"""Which pods are reported, and how the reconcile queue folds, serialises and retries."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from sidekey.operator import pods, queueing


def _facts(ns: str = "team", annotation: str | None = "true", image: str | None = None,
           finished: bool = False) -> pods.PodFacts:
    return pods.PodFacts(ns, "p", "uid", annotation, image, finished)


@pytest.mark.parametrize(("pod", "labelled", "state"), [
    (_facts(), set(), "uninjected"),
    (_facts(image="img:2"), set(), "injected"),
    (_facts(image="img:1"), set(), "outdated"),
    (_facts(annotation=None), set(), "ignored"),
    (_facts(annotation=None), {"team"}, "uninjected"),
    (_facts(annotation="false"), {"team"}, "ignored"),
    (_facts(ns="kube-system"), set(), "ignored"),
    (_facts(ns="sidekey-system"), set(), "ignored"),
    (_facts(finished=True), set(), "ignored"),
])
def test_pods_are_classified_by_the_webhooks_opt_in_rule(pod: pods.PodFacts, labelled: set[str],
                                                         state: str) -> None:
    assert pods.classify(pod, labelled_namespaces=labelled, rules=RULES) == state


RULES = pods.Rules(own_namespace="sidekey-system", sidecar_image="img:2",
                   sidecar_images=frozenset({"mirror.example/sidekey:2"}),
                   excluded_namespaces=frozenset({"legacy"}))


@pytest.mark.parametrize("labelled", [set(), {"legacy"}])
def test_a_pod_in_an_excluded_namespace_is_never_reported_missing_its_sidecar(
        labelled: set[str]) -> None:
    # Bug: the operator ignored webhook.excludedNamespaces and warned SidecarMissing
    # about pods the webhook is configured never to inject.
    assert pods.classify(_facts(ns="legacy"), labelled_namespaces=labelled, rules=RULES) == "ignored"


def test_a_pod_running_an_allow_listed_sidecar_image_is_current_not_outdated() -> None:
    # Bug: a pod that picked an allow-listed image with sidekey.io/image was
    # reported SidecarOutdated for as long as it ran.
    pod = _facts(image="mirror.example/sidekey:2")
    assert pods.classify(pod, labelled_namespaces=set(), rules=RULES) == "injected"
    elsewhere = _facts(image="mirror.example/sidekey:1")
    assert pods.classify(elsewhere, labelled_namespaces=set(), rules=RULES) == "outdated"


def test_the_sidecar_is_found_as_a_native_sidecar_or_a_container() -> None:
    body: dict[str, Any] = {"metadata": {"namespace": "n", "name": "p", "uid": "u"},
                            "spec": {"initContainers": [{"name": "sidekey-proxy", "image": "i:1"}],
                                     "containers": [{"name": "agent", "image": "a"}]},
                            "status": {"phase": "Running"}}
    assert pods.PodFacts.from_body(body).sidecar_image == "i:1"
    body["status"]["phase"] = "Succeeded"
    assert pods.PodFacts.from_body(body).finished


async def test_a_key_added_many_times_runs_once_and_never_twice_at_once() -> None:
    runs: list[str] = []
    running: set[str] = set()
    gate = asyncio.Event()

    async def work(key: str) -> None:
        assert key not in running
        running.add(key)
        runs.append(key)
        await gate.wait()
        running.discard(key)

    q: queueing.Queue[str] = queueing.Queue(work, workers=3)
    task = asyncio.create_task(q.run())
    for _ in range(5):
        q.add("a")
    await asyncio.sleep(0.05)
    for _ in range(5):
        q.add("a")  # arrives mid-run: exactly one more run
    gate.set()
    await asyncio.wait_for(q.wait_idle(), 2)
    task.cancel()
    assert runs == ["a", "a"]


async def test_a_failing_key_is_retried_with_backoff_until_it_succeeds() -> None:
    attempts: list[float] = []

    async def work(key: str) -> None:
        attempts.append(asyncio.get_running_loop().time())
        if len(attempts) < 3:
            raise queueing.Retry("not yet")

    q: queueing.Queue[str] = queueing.Queue(work, base_delay=0.05, max_delay=1.0)
    task = asyncio.create_task(q.run())
    q.add("k")
    await asyncio.wait_for(q.wait_idle(), 5)
    task.cancel()
    assert len(attempts) == 3
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.03 and gaps[1] >= gaps[0] * 1.2


def test_backoff_is_capped() -> None:
    async def work(key: str) -> None:
        return None

    q: queueing.Queue[str] = queueing.Queue(work, base_delay=0.5, max_delay=60)
    assert q.backoff(1) < 1 and q.backoff(30) <= 72


async def test_closing_lets_the_running_key_finish_and_drops_the_waiting_ones() -> None:
    started: list[str] = []
    finished: list[str] = []
    gate = asyncio.Event()

    async def work(key: str) -> None:
        started.append(key)
        await gate.wait()
        finished.append(key)

    q: queueing.Queue[str] = queueing.Queue(work, workers=1)
    task = asyncio.create_task(q.run())
    q.add("a")
    q.add("b")  # waits for the one worker
    q.add_after("c", 60)  # a retry waiting out its backoff
    await asyncio.sleep(0.05)
    q.add("a")  # arrives mid-run: would run "a" once more
    q.close()
    q.add("d")  # after close: ignored
    q.add_after("e", 0)
    assert q.running == {"a"} and q.depth == 1
    await asyncio.sleep(0.05)
    assert not task.done() and finished == []  # the run that began is not cut short
    gate.set()
    await asyncio.wait_for(q.wait_idle(), 1)
    assert started == finished == ["a"] and q.depth == 0
    task.cancel()  # only idle workers are left to interrupt
    with pytest.raises(asyncio.CancelledError):
        await task
