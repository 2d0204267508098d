"""The path-normalisation table: tricks that must never move the key elsewhere."""

from __future__ import annotations

import pytest

from sidekey.proxy import paths

TRICKS = [
    "/openai/../admin",
    "/openai/v1/../../admin",
    "/openai/./v1",
    "/openai/v1/.",
    "/openai/v1/..",
    "/openai/%2e%2e/admin",
    "/openai/%2E%2E/admin",
    "/openai/.%2e/admin",
    "/openai/%2e./admin",
    "/openai/%2e/admin",
    "/openai/%252e%252e/admin",  # double encoding
    "/openai/v1%2fadmin",
    "/openai/v1%2Fadmin",
    "/openai/v1%5cadmin",
    "/openai/v1%5Cadmin",
    "/openai/v1\\admin",
    "/openai/v1\\..\\admin",
    "/openai//admin",
    "/openai/v1//admin",
    "//openai/v1",
    "http://evil.example/openai/v1",
    "https://evil.example/openai/v1",
    "evil.example/openai",
    "*",
    "/openai/v1/..;/admin",
    "/openai/v1/..;x=1/admin",
    "/openai/v1%00/admin",
    "/openai/v1%0d%0aX-Injected:%201",
    "/openai/v1\r\nX: 1",
    "/openai/v1\t/x",
    "/openai/v1 /x",
    "/openai/v1%7f",
    "/openai/%c0%ae%c0%ae/admin",  # overlong UTF-8 dots
    "/openai/%ef%bc%8e%ef%bc%8e/admin",  # fullwidth dots
    "/openai/v1%ef%bc%8fadmin",  # fullwidth slash
    "/openai/v1/%zz",
    "/openai/v1/%2",
    "/openai/v1#frag",
    "/openai/café",
    "/../openai/v1",
    "/openai/v1?x=%00",
    "/openai/v1?x=a b",
    "",
    # segments of only dots and blanks, after decoding and NFKC
    "/openai/.../admin",
    "/openai/..../admin",
    "/openai/..%20/admin",
    "/openai/%20../admin",
    "/openai/..%C2%A0/admin",  # no-break space
    "/openai/..%e3%80%80/admin",  # ideographic space
    "/openai/..%e2%80%8b/admin",  # zero-width space (a format character, not isspace)
    "/openai/%e2%80%a4%e2%80%a4/admin",  # one-dot leaders
    "/openai/.%20./admin",
    "/openai/...;x/admin",
    "/openai/..%20;x/admin",
    "/.../admin",
    # a final newline, which '$' would have let through (found by the fuzz test)
    "/openai/\n",
    "/openai/models\n",
    "/openai/models?x=1\n",
]


@pytest.mark.parametrize("target", TRICKS)
def test_tricks_are_refused_with_a_message(target: str) -> None:
    with pytest.raises(paths.PathError) as info:
        paths.parse(target)
    assert str(info.value)


def test_the_table_has_at_least_thirty_tricks() -> None:
    assert len(TRICKS) >= 30


@pytest.mark.parametrize(
    "target,route,path,query,segments",
    [
        ("/openai", "openai", "", "", ()),
        ("/openai/", "openai", "/", "", ()),
        ("/openai/v1/chat/completions", "openai", "/v1/chat/completions", "", ("v1", "chat", "completions")),
        ("/openai/v1/models/", "openai", "/v1/models/", "", ("v1", "models")),
        (
            "/openai/v1/files?purpose=batch&limit=2",
            "openai",
            "/v1/files",
            "purpose=batch&limit=2",
            ("v1", "files"),
        ),
        ("/gcs/b/my%20file.txt", "gcs", "/b/my%20file.txt", "", ("b", "my file.txt")),
        (
            "/openai/v1/models/gpt-4o:latest",
            "openai",
            "/v1/models/gpt-4o:latest",
            "",
            ("v1", "models", "gpt-4o:latest"),
        ),
        ("/openai/v1/a.b/..c", "openai", "/v1/a.b/..c", "", ("v1", "a.b", "..c")),
        ("/openai/v1?q=a%2Fb", "openai", "/v1", "q=a%2Fb", ("v1",)),
    ],
)
def test_ordinary_paths_pass_unchanged(
    target: str, route: str, path: str, query: str, segments: tuple[str, ...]
) -> None:
    t = paths.parse(target)
    assert (t.route, t.path, t.query, t.segments) == (route, path, query, segments)


@pytest.mark.parametrize(
    "target",
    [
        "/openai",
        "/openai/",
        "/openai/v1/chat/completions",
        "/openai/v1/models/gpt-4.1",
        "/openai/v1/files?purpose=batch&limit=2",
        "/gcs/b/my%20file.txt",
        "/o/a.b/..c",
        "/o/.well-known/x",
        "/o/v1?q=a%2Fb",
        "/o/v1:generate?alt=sse",
        "/o/x;y",
        "/o/~user/a+b",
    ],
)
def test_the_fast_path_agrees_with_the_careful_one(target: str) -> None:
    assert paths.parse(target) == paths._parse_carefully(target)


@pytest.mark.parametrize("segment", ["a...", "...a", "v1.2", ".well-known", "..a", "a..", "%20", "a%20b"])
def test_dots_with_other_characters_are_ordinary_segments(segment: str) -> None:
    assert paths.parse(f"/openai/{segment}/x").segments[1] == "x"
