"""One opt-in rule: the webhook injects exactly the pods the operator calls opted in."""

from __future__ import annotations

import itertools

import pytest

from sidekey.core import contract, optin
from sidekey.operator import pods
from sidekey.webhook import eligibility
from sidekey.webhook import settings as webhook_settings

OWN = "sidekey-system"
EXCLUDED = frozenset({"legacy"})


@pytest.mark.parametrize(("namespace", "annotation", "labelled", "inject", "reason"), [
    ("team", "true", False, True, "annotation"),
    ("team", "false", True, False, "opted-out"),
    ("team", None, True, True, "namespace-label"),
    ("team", None, False, False, "not-opted-in"),
    ("team", "yes", True, True, "namespace-label"),
    ("kube-system", "true", True, False, "system-namespace"),
    (OWN, "true", True, False, "own-namespace"),
    ("legacy", "true", True, False, "excluded-namespace"),
])
def test_the_rule(namespace: str, annotation: str | None, labelled: bool, inject: bool,
                  reason: str) -> None:
    annotations = {contract.ANNOTATION_INJECT: annotation} if annotation is not None else {}
    d = optin.decide(namespace, annotations, namespace_opted_in=labelled,
                     excluded_namespaces=EXCLUDED, own_namespace=OWN)
    assert (d.inject, d.reason) == (inject, reason)


def test_an_unknown_annotation_value_is_ignored_with_a_warning() -> None:
    d = optin.decide("team", {contract.ANNOTATION_INJECT: "yes"}, namespace_opted_in=False,
                     excluded_namespaces=(), own_namespace=None)
    assert not d.inject and d.warning is not None and "'yes'" in d.warning


def test_the_default_image_and_the_allow_list_are_allowed() -> None:
    assert optin.allowed_image("a:1", default="a:1", allow_list=())
    assert optin.allowed_image("m:1", default="a:1", allow_list={"m:1"})
    assert not optin.allowed_image("a:0", default="a:1", allow_list={"m:1"})


def test_the_webhook_and_the_operator_agree_on_every_pod() -> None:
    settings = webhook_settings.Settings(excluded_namespaces=EXCLUDED)
    rules = pods.Rules(own_namespace=OWN, sidecar_image=None, excluded_namespaces=EXCLUDED)
    namespaces = ["team", "legacy", "kube-system", "kube-public", OWN]
    for ns, annotation, labelled in itertools.product(namespaces, ["true", "false", "maybe", None],
                                                      [True, False]):
        annotations = {contract.ANNOTATION_INJECT: annotation} if annotation is not None else {}
        webhook = eligibility.decide(ns, annotations, namespace_opted_in=labelled,
                                     settings=settings, own_namespace=OWN).inject
        facts = pods.PodFacts(ns, "p", "u", annotation, None, False)
        operator = pods.classify(facts, labelled_namespaces={ns} if labelled else set(),
                                 rules=rules) != "ignored"
        assert webhook == operator, (ns, annotation, labelled)
