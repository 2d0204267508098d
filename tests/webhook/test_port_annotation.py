"""A port annotation of digits that are not ASCII ("²", "٣") is refused naming the annotation.

``"²".isdigit()`` is true and ``int("²")`` raises, so such a value once
reached ``int()`` and the review was answered 500/503 "internal error"
instead of a refusal that says which annotation to fix.
"""

from __future__ import annotations

import pytest

from sidekey.core import contract
from sidekey.localcluster import subjects
from sidekey.webhook import caching, serving, settings
from sidekey.webhook import metrics as metrics_mod
from tests.webhook import reviewing

#: An ordinary policy for the pod's account: the refusal must come from the annotation alone.
POLICY = subjects.policy("agents", "openai", ["agent"], [{
    "name": "openai", "url": "https://api.openai.com/v1",
    "auth": {"type": "bearer", "secretRef": {"name": "openai-key", "key": "api-key"}},
    "allow": [{"paths": ["/**"]}]}])


#: Superscript, mixed, Arabic-Indic and fullwidth digits: isdigit() accepts them all.
NOT_ASCII_DIGITS = ["\u00b2", "8\u00b2", "\u0663\u0660\u0660\u0660", "\uff18\uff10\uff18\uff10"]

@pytest.mark.parametrize("value", NOT_ASCII_DIGITS)
async def test_a_port_annotation_of_non_ascii_digits_is_a_refusal_naming_it(value: str) -> None:
    h = serving.Handler(settings.Settings(), caching.StaticPolicies([POLICY]),
                        metrics=metrics_mod.Metrics(), own_namespace="sidekey-system", cluster_minor=36)
    doc = reviewing.review(reviewing.pod(annotations={contract.ANNOTATION_PORT: value}))
    status, out = await h.review(reviewing.body(doc))
    assert status == 200, out
    response = out["response"]
    assert response["allowed"] is False
    assert contract.ANNOTATION_PORT in response["status"]["message"]
    assert "not a port number" in response["status"]["message"]
