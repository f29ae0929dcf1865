"""The two roles as data: for each turn kind, who takes it, the parser of its output and its reward.

A turn kind is a `Turn` record, not a class: the template it renders is chosen by the config
(`prompts.<kind>`), the parser turns untrusted model text into a value (malformed text parses to
None, never raises), and the reward is a plain function of verified outcomes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Turn:
    role: str  # "student" or "tutor"
    kind: str  # "attempt", "hint", "mutate", "judge"
    parse: Callable[[str], Any]
    reward: Callable[..., float]
    example_vars: dict  # a full set of template variables: checked at start-up with StrictUndefined


from roles.student import ATTEMPT  # noqa: E402
from roles.tutor import HINT, JUDGE, MUTATE  # noqa: E402

TURNS = {t.kind: t for t in (ATTEMPT, HINT, MUTATE, JUDGE)}
