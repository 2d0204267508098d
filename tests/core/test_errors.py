"""One exception root, three branches, and one error body shape."""

from __future__ import annotations

import pytest

from sidekey.core import errors, health


def test_an_invalid_input_names_its_field_and_is_a_value_error() -> None:
    exc = errors.InvalidInput("spec.upstreams[0].url", "must be https")
    assert isinstance(exc, errors.SidekeyError) and isinstance(exc, ValueError)
    assert str(exc) == "spec.upstreams[0].url: must be https"
    assert exc.field == "spec.upstreams[0].url" and exc.message == "must be https"


def test_a_denial_carries_a_reason_for_metrics_apart_from_its_message() -> None:
    exc = errors.Denied("expired", "token expired 5 s ago")
    assert str(exc) == "token expired 5 s ago" and exc.reason == "expired"
    with pytest.raises(errors.SidekeyError):
        raise exc


def test_every_error_renders_the_one_body_shape() -> None:
    assert errors.Unavailable("the apiserver is not reachable").body() == {
        "error": {"type": "unavailable", "message": "the apiserver is not reachable"}}
    assert errors.body("not_found", "no upstream 'x'") == {"error": {"type": "not_found", "message": "no upstream 'x'"}}


def test_readiness_names_the_failing_checks() -> None:
    assert health.readiness({}) == (200, {"ready": True, "failing": {}})
    assert health.readiness({"policies": "not listed yet"}) == (
        503, {"ready": False, "failing": {"policies": "not listed yet"}})
