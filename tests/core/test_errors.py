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


def test_the_tree_in_the_docstring_is_the_tree_in_the_code() -> None:
    from sidekey.core import httpclient, kubeapi, llmledger, llmpolicy, policies, tokens
    from sidekey.proxy import (
        credentials,
        decoding,
        listener,
        llmrequests,
        llmslices,
        paths,
        refusals,
        upstream,
    )
    from sidekey.proxy import settings as proxy_settings
    from sidekey.webhook import caching, patching, reviews, shapes
    from sidekey.webhook import settings as webhook_settings

    branches = {
        errors.InvalidInput: [policies.PolicyError, llmpolicy.FieldError, webhook_settings.SettingsError,
                              reviews.BadReview, shapes.ShapeError, patching.BadPod, proxy_settings.SettingsError,
                              paths.PathError, listener.Malformed, llmledger.LedgerError],
        errors.Denied: [tokens.TokenError, patching.Refused, refusals.Refusal, llmrequests.LlmRefusal],
        errors.Unavailable: [caching.Unavailable, credentials.CredentialError, upstream.UpstreamError,
                             llmslices.LedgerUnavailable, httpclient.HttpError, httpclient.HttpTimeout,
                             httpclient.BodyTooLarge],
        errors.SidekeyError: [kubeapi.ApiError, decoding.DecodeError],
    }
    for branch, members in branches.items():
        for cls in members:
            assert issubclass(cls, branch), f"{cls.__module__}.{cls.__name__} is not a {branch.__name__}"
            assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} is missing from the drawing"


def test_a_transport_failure_is_unavailable_and_still_an_os_error() -> None:
    """Callers that caught aiohttp's connection errors as OSError keep catching the small client's."""
    from sidekey.core import httpclient

    exc = httpclient.HttpTimeout("no answer within 1 s")
    assert isinstance(exc, errors.Unavailable) and isinstance(exc, OSError) and isinstance(exc, TimeoutError)
    assert str(exc) == exc.message == "no answer within 1 s"
    assert exc.body() == {"error": {"type": "http_timeout", "message": "no answer within 1 s"}}
