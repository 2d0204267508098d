"""Fuzzing the sidecar's request-target check: what it accepts cannot be read as another path.

The sidecar refuses every target an upstream could normalise differently and
forwards the rest byte for byte. So for any accepted target, whatever the
upstream does with it (percent-decode once or twice, resolve dot segments,
treat backslashes as slashes) it lands on the same segments the allow rules
were matched against, under the route's base path. Targets are built from the
pieces path tricks are made of, plus arbitrary text.
"""

from __future__ import annotations

import posixpath
import sys
import unicodedata
from urllib.parse import unquote

from hypothesis import given, settings
from hypothesis import strategies as st

from sidekey.proxy import paths

PIECES = st.sampled_from([
    "/", "/", "/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\", "%25", "%252e", "%", "%00",
    "%0d%0a", "%0a", "?", "#", "@", ":", ";", "~", "a", "v1", "models", "%c0%ae", "%ef%bc%8e", "%e2%80%a4",
    "%ef%bc%8f", " ", "\t", "é", "%c3%a9", "%ff", "+", "&", "=", "//", "http:", "%3f", "%23",
    "...", "%20", "%c2%a0", "%e3%80%80", "%e2%80%8b", "%09",
])
#: Every character that is blank to someone: whitespace, and the format characters (zero-width space).
BLANKS = "".join(c for c in map(chr, range(sys.maxunicode + 1))
                 if c.isspace() or unicodedata.category(c) in ("Zs", "Zl", "Zp", "Cc", "Cf"))
TARGETS = st.one_of(
    st.lists(PIECES, min_size=1, max_size=14).map(lambda xs: "/" + "".join(xs)),
    st.lists(PIECES, min_size=1, max_size=14).map(lambda xs: "/openai/" + "".join(xs)),
    st.text(min_size=0, max_size=40).map(lambda s: "/openai/" + s),
    st.text(min_size=0, max_size=40),
)


def _upstream_views(path: str) -> list[str]:
    """How upstreams may read a forwarded path: decoded once or twice, backslashes as slashes."""
    once = unquote(path)
    twice = unquote(once)
    return [path, once, twice, once.replace("\\", "/"), twice.replace("\\", "/")]


@settings(max_examples=1500, deadline=2_000)
@given(target=TARGETS)
def test_an_accepted_target_means_the_same_path_to_any_upstream(target: str) -> None:
    try:
        t = paths.parse(target)
    except paths.PathError as exc:
        assert str(exc), "a refusal must say what to fix"
        return
    # forwarded byte for byte: the route and the raw rest rebuild the target
    rebuilt = f"/{t.route}{t.path}" + (f"?{t.query}" if t.query or target.endswith("?") else "")
    assert rebuilt == target.split("#")[0]
    for seg in t.segments:
        assert seg not in ("", ".", ".."), (target, t.segments)
        # no segment an upstream that trims blanks (or reads any run of dots as "up") could climb with
        folded = unicodedata.normalize("NFKC", seg.split(";", 1)[0])
        assert folded.strip("." + BLANKS) != "" or "." not in folded, (target, t.segments)
        assert "/" not in seg and "\\" not in seg, (target, t.segments)
        assert not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in seg), (target, t.segments)
    for view in _upstream_views(t.path):
        # resolving dot segments changes nothing, and the segments are the ones matched
        normalised = posixpath.normpath(view) if view else ""
        segments = [s for s in normalised.split("/") if s and s != "."]
        assert len(segments) == len(t.segments) and ".." not in segments, (target, view, segments)
    decoded = [s for s in unquote(t.path).split("/") if s]
    assert decoded == list(t.segments), (target, decoded, t.segments)
    assert t.route not in ("", ".", "..") and "\\" not in t.route


@settings(max_examples=500, deadline=2_000)
@given(target=st.binary(max_size=60).map(lambda b: "/" + b.decode("latin-1")))
def test_any_bytes_get_a_target_or_a_path_error_never_a_crash(target: str) -> None:
    try:
        t = paths.parse(target)
    except paths.PathError as exc:
        assert str(exc)
        return
    assert target.isascii() and t.route
