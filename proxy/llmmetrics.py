"""The sidecar's LLM metrics, in the sidecar's registry (``metrics.REGISTRY``).

The ``model`` label must not let an agent grow the label set: a request may
name any model a ``*`` pattern admits (``gpt-4.1-<anything>``). So the label
is the allow-list entry that admitted the model (the exact name, or the
pattern as written), and without an allow-list the first ``MAX_MODELS``
names seen, then ``other``.
"""

from __future__ import annotations

from typing import Any, Final

from sidekey.core import llmpolicy
from sidekey.proxy import metrics
from sidekey.proxy.metrictypes import Counter, Gauge

MAX_MODELS: Final = 32

TOKENS: Final = Counter(
    "sidekey_llm_tokens",
    "LLM tokens as the upstream reported them (or as estimated when it did not), by kind: "
    "input (uncached), cached (input read from or written to a prompt cache), output.",
    ["upstream", "model", "kind"],
    registry=metrics.REGISTRY,
)
BUDGET_REMAINING: Final = Gauge(
    "sidekey_budget_remaining_tokens",
    "Tokens this sidecar may still reserve in the current window, by upstream and budget scope "
    "(for a serviceAccount budget: what it holds of its slices).",
    ["upstream", "scope", "window"],
    registry=metrics.REGISTRY,
)
DENIALS: Final = Counter(
    "sidekey_llm_denials",
    "LLM requests refused or cut, by reason: model_not_allowed, bad_llm_body, budget_spent, budget_cut.",
    ["upstream", "reason"],
    registry=metrics.REGISTRY,
)

_seen: dict[str, set[str]] = {}


def model_label(llm: llmpolicy.Llm, upstream: str, model: str) -> str:
    for pattern in llm.models:
        if pattern.matches(model):
            return pattern.text
    seen = _seen.setdefault(upstream, set())
    if model in seen:
        return model
    if len(seen) < MAX_MODELS:
        seen.add(model)
        return model
    return "other"


_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(family: Any, *labels: str) -> Any:
    """``family.labels(*labels)``, cached: the lookup takes a lock and builds a tuple each time."""
    key = (id(family), labels)
    found = _children.get(key)
    if found is None:
        found = family.labels(*labels)
        if len(_children) < 4096:
            _children[key] = found
    return found
