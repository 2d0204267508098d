"""The operator and the webhook get the opt-in inputs from the same chart values.

The operator judges pods by the webhook's rule (``core/optin.py``) and the
bypass guard's token rule (``operator/exposure.py``); both need the lists the
chart gives the webhook. Rendered by the real ``helm template``, parsed by the
operator's own argument parser and the webhook's own settings parser.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from sidekey.localcluster import helm
from sidekey.operator import options
from sidekey.webhook import settings as webhook_settings

VALUES = {
    "sidecar": {"imageAllowList": ["mirror.example/sidekey:1", "mirror.example/sidekey:2"],
                "audience": "sidekey-prod"},
    "webhook": {"excludedNamespaces": ["legacy", "batch"]},
    "guards": {"extraTokenAudiences": ["sts.amazonaws.com"]},
}


def _rendered(values: dict[str, Any]) -> tuple[options.Options, webhook_settings.Settings]:
    docs = helm.template(values, show_only=["templates/operator-deployment.yaml",
                                            "templates/webhook-configmap.yaml"])
    by_kind = {d["kind"]: d for d in docs}
    args = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "operator"
    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    opts = options.from_args(parser.parse_args(args[1:]))
    settings = webhook_settings.from_mapping(yaml.safe_load(by_kind["ConfigMap"]["data"]["settings.yaml"]))
    return opts, settings


def test_the_operator_gets_the_webhooks_excluded_namespaces_and_images() -> None:
    opts, settings = _rendered(VALUES)
    assert opts.excluded_namespaces == settings.excluded_namespaces == {"legacy", "batch"}
    assert opts.sidecar_image == settings.image
    assert opts.sidecar_images | {opts.sidecar_image} == settings.image_allow_list
    assert opts.agent_audiences == {"sidekey-prod", "sts.amazonaws.com"}
    assert settings.audience in opts.agent_audiences


def test_by_default_only_the_sidekey_audience_and_no_exclusions() -> None:
    opts, settings = _rendered({})
    assert opts.excluded_namespaces == settings.excluded_namespaces == frozenset()
    assert opts.agent_audiences == {settings.audience}
    assert opts.sidecar_images | {opts.sidecar_image} == settings.image_allow_list
