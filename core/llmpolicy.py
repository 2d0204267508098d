"""The LLM part of an upstream's policy: which API shape, which models, which token budgets.

An upstream with ``api`` set is an LLM API: the sidecar reads the request
body (to find the model and estimate the tokens) instead of treating it as
opaque bytes. Without ``api`` the upstream is paths-only, as before, and
``models``/``budgets`` are refused, because nothing would enforce them.

Budget windows are **fixed**, aligned to the Unix epoch: a ``24h`` window is
the UTC day, ``1h`` the clock hour, ``30d`` a run of 30 days counted from
1970-01-01. Fixed windows were chosen over rolling ones because:

- a window has a name (its start), so a ledger shared by many sidecars can
  hold one counter per window and roll over without a history of spends;
- ``Retry-After`` is exact (the window's end), and the status can say "spent
  X of Y in the window that started at T";
- a rolling window needs every spend's timestamp, which a Lease-sized object
  cannot hold for thousands of requests.

The price is the known one: an agent can spend a full budget at the end of
one window and again at the start of the next.

The operator parses this too (it validates the fields and keeps the
ledgers of ``serviceAccount`` budgets), which is why it lives in the core.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from sidekey.core import errors

Api = Literal["openai", "anthropic"]
APIS: Final[tuple[str, ...]] = get_args(Api)
Scope = Literal["pod", "serviceAccount"]
SCOPES: Final[tuple[str, ...]] = get_args(Scope)

#: Window lengths: a count and a unit (minutes, hours, days).
_WINDOW = re.compile(r"^([1-9][0-9]{0,4})(m|h|d)\Z")
_UNITS: Final = {"m": 60, "h": 3600, "d": 86400}
MIN_WINDOW_SECONDS: Final = 60
MAX_WINDOW_SECONDS: Final = 366 * 86400
MAX_BUDGET_TOKENS: Final = 10**12
MAX_MODELS: Final = 64
MAX_BUDGETS: Final = 8
#: Model names as the providers spell them (``gpt-4.1-mini``, ``claude-sonnet-4-5``,
#: ``ft:gpt-4o:org::id``, ``meta-llama/Llama-3-70b``), optionally ending in ``*``.
_MODEL = re.compile(r"^(\*|[A-Za-z0-9][-A-Za-z0-9._:/@+]{0,199}\*?)\Z")


class FieldError(errors.InvalidInput):
    """A field of the LLM policy that cannot be used; ``policies`` turns it into a PolicyError."""


@dataclass(frozen=True, slots=True)
class ModelPattern:
    """An exact model name, or a prefix ending in ``*`` (``gpt-4.1*``; ``*`` alone is any)."""

    text: str

    def matches(self, model: str) -> bool:
        if self.text.endswith("*"):
            return model.startswith(self.text[:-1])
        return model == self.text


@dataclass(frozen=True, slots=True)
class Budget:
    """``tokens`` per fixed window of ``window_seconds``, per pod or per service account."""

    tokens: int
    window: str  # as written: "1h", "24h", "30d"
    window_seconds: int
    scope: Scope

    def window_start(self, now: float) -> int:
        """The start (Unix seconds) of the window holding ``now``."""
        return int(now // self.window_seconds) * self.window_seconds

    def window_end(self, now: float) -> int:
        return self.window_start(now) + self.window_seconds

    @property
    def label(self) -> str:
        """How messages and metrics name it: ``100000 tokens per 24h per serviceAccount``."""
        return f"{self.tokens} tokens per {self.window} per {self.scope}"


@dataclass(frozen=True, slots=True)
class Llm:
    api: Api
    models: tuple[ModelPattern, ...]  # empty: any model
    budgets: tuple[Budget, ...]
    #: Set ``max_tokens`` to what is left when a request gives none (``capMaxTokens``).
    cap_max_tokens: bool = True

    def allows_model(self, model: str) -> bool:
        return not self.models or any(p.matches(model) for p in self.models)


def window_seconds(text: str) -> int:
    """``"24h"`` -> 86400; ValueError with what to write instead."""
    m = _WINDOW.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a window: write a count and a unit, such as 30m, 1h, 24h or 30d")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if not MIN_WINDOW_SECONDS <= seconds <= MAX_WINDOW_SECONDS:
        raise ValueError(f"{text!r} must be between 1m and 366d")
    return seconds


def parse(raw: Mapping[str, Any], where: str) -> Llm | None:
    """The LLM fields of one upstream (``where`` is its path), or None when ``api`` is absent."""
    api = raw.get("api")
    if api is None:
        for name in ("models", "budgets", "capMaxTokens"):
            if raw.get(name) is not None:
                raise FieldError(f"{where}.{name}",
                                 "needs api (openai or anthropic): the sidecar reads request bodies only then")
        return None
    if api not in APIS:
        raise FieldError(f"{where}.api", f"must be one of {', '.join(APIS)}, got {api!r}")
    models_raw = raw.get("models") or []
    if not isinstance(models_raw, list) or len(models_raw) > MAX_MODELS:
        raise FieldError(f"{where}.models", f"must be a list of at most {MAX_MODELS} model names")
    models: list[ModelPattern] = []
    for i, m in enumerate(models_raw):
        if not isinstance(m, str) or not _MODEL.match(m):
            raise FieldError(f"{where}.models[{i}]",
                             f"{m!r} is not a model name or pattern: write the exact name "
                             "(gpt-4.1-mini) or a prefix ending in '*' (gpt-4.1*)")
        models.append(ModelPattern(m))
    budgets_raw = raw.get("budgets") or []
    if not isinstance(budgets_raw, list) or len(budgets_raw) > MAX_BUDGETS:
        raise FieldError(f"{where}.budgets", f"must be a list of at most {MAX_BUDGETS} budgets")
    budgets: list[Budget] = []
    seen: dict[tuple[str, str], int] = {}
    for i, b in enumerate(budgets_raw):
        bw = f"{where}.budgets[{i}]"
        if not isinstance(b, Mapping):
            raise FieldError(bw, "must be an object with tokens, window and scope")
        tokens = b.get("tokens")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= MAX_BUDGET_TOKENS:
            raise FieldError(f"{bw}.tokens", f"must be an integer between 1 and {MAX_BUDGET_TOKENS}, got {tokens!r}")
        window = b.get("window")
        if not isinstance(window, str):
            raise FieldError(f"{bw}.window", "is required: a fixed window such as 1h, 24h or 30d")
        try:
            seconds = window_seconds(window)
        except ValueError as exc:
            raise FieldError(f"{bw}.window", str(exc)) from None
        scope = b.get("scope", "pod")
        if scope not in SCOPES:
            raise FieldError(f"{bw}.scope", f"must be one of {', '.join(SCOPES)}, got {scope!r}")
        if (window, scope) in seen:
            raise FieldError(bw, f"repeats the window and scope of budgets[{seen[(window, scope)]}]")
        seen[(window, scope)] = i
        budgets.append(Budget(tokens, window, seconds, scope))
    cap = raw.get("capMaxTokens", True)
    if not isinstance(cap, bool):
        raise FieldError(f"{where}.capMaxTokens", "must be a boolean")
    return Llm(api=api, models=tuple(models), budgets=tuple(budgets), cap_max_tokens=cap)
