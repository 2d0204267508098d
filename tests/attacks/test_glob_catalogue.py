"""The glob catalogue: policy patterns and request paths that would stall the sidecar's matcher.

Every stream of a pod shares the sidecar's event loop, so a match that takes
seconds stalls all of them. An agent picks the request path; a policy author
picks patterns like ``/**/a/**/b/**/c``, where a backtracking matcher tries
every split of a 1.2 KB path between the ``**`` (cubic: seconds). Each case
here counts how often the matcher reads a path segment, which does not depend
on the machine's speed: a linear matcher reads each segment once. The time
bound itself is measured by ``python -m bench.globs``, not by a unit test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import pytest

from sidekey.core import policies


class CountingPath(Sequence[str]):
    """A request path's segments that count every read of a segment."""

    def __init__(self, segments: list[str]) -> None:
        self._segments = segments
        self.reads = 0

    def __len__(self) -> int:
        return len(self._segments)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        self.reads += 1
        return self._segments[index]


#: name -> (pattern, request path, whether it matches); each path is about 1.2 KB.
CATALOGUE: dict[str, tuple[str, list[str], bool]] = {
    "three-double-stars-no-final-literal": ("/**/a/**/b/**/c", ["a", "b"] * 300, False),
    "three-double-stars-match-at-the-end": ("/**/a/**/b/**/c", ["a", "b"] * 299 + ["c"], True),
    "one-repeated-literal": ("/**/a/**/a/**/z", ["a"] * 600, False),
    "stars-between-double-stars": ("/**/*/a/**/*/b/**/c", ["a"] * 300 + ["b"] * 300, False),
    "adjacent-double-stars": ("/**/**/a/**/**/b/**/**/c", ["a", "b"] * 300, False),
}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_a_hostile_pattern_and_path_are_matched_in_one_pass(case: str) -> None:
    text, segments, expected = CATALOGUE[case]
    path = CountingPath(segments)
    assert policies.PathPattern.compile(text).matches(path) is expected
    # one read per segment, plus the one that ends an iteration; backtracking read millions
    assert path.reads <= len(segments) + 1, f"{case}: {path.reads} reads of a {len(segments)}-segment path"
