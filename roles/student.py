"""Student attempt: sees the task (and a hint, if any), writes a solution.

Reward: 1 if the verifier says solved; `format_credit` for a well-formed answer with valid
arithmetic that reaches the wrong value; 0 otherwise. Group: the G attempts on one prompt.
"""

from __future__ import annotations

import re

from roles import Turn
from selfplay.domains.countdown import Verdict

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_CLAIMED = re.compile(r"^([0-9+\-*/() ]+)=\s*-?[0-9.]+$")  # `9 + 18 - 7 + 3 = 23`: a claimed value


def extract_answer(text: str) -> str:
    """The answer part of a completion: inside the last <answer> tags (chat models), else its first
    non-empty line; a line `expression = value` gives the expression (the verifier computes the
    value itself, so a claimed value never counts). The tiny model writes one bare line."""
    found = _ANSWER.findall(text or "")
    if found:
        return found[-1].strip()
    line = next((x.strip() for x in (text or "").splitlines() if x.strip()), "")
    claimed = _CLAIMED.match(line)
    return claimed[1].strip() if claimed else line


def attempt_reward(verdict: Verdict, format_credit: float) -> float:
    if verdict.solved:
        return 1.0
    return format_credit if verdict.well_formed else 0.0


ATTEMPT = Turn("student", "attempt", extract_answer, attempt_reward,
               {"numbers": [3, 7, 25], "target": 21, "hint": "25-7=18"})
