"""A Countdown task and its file formats: JSONL (`{"numbers": [..], "target": N}` per line, unknown keys
kept in `extra`) and the tiny model's one-line form `3 7 25>21` (what the tutor's mutate turn writes)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable


@dataclass
class Task:
    """A Countdown task. `id`/`parent`/`source` are curriculum metadata; `extra` keeps unknown JSONL keys."""

    numbers: list[int]
    target: int
    id: str | None = None
    parent: str | None = None
    source: str = "generated"
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Canonical identity of the puzzle (order of numbers does not matter)."""
        return " ".join(map(str, sorted(self.numbers))) + f">{self.target}"

    def to_json(self) -> dict:
        d = {"numbers": list(self.numbers), "target": self.target, **self.extra}
        for k in ("id", "parent"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.source != "generated":
            d["source"] = self.source
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Task":
        if not isinstance(d, dict):
            raise ValueError("a task line must be a JSON object")
        nums, target = d.get("numbers"), d.get("target")
        if not isinstance(nums, list) or not nums or not all(type(n) is int and n > 0 for n in nums):
            raise ValueError("'numbers' must be a non-empty list of positive integers")
        if type(target) is not int:
            raise ValueError("'target' must be an integer")
        known = {"numbers", "target", "id", "parent", "source"}
        return cls(list(nums), target, d.get("id"), d.get("parent"), d.get("source", "generated"),
                   {k: v for k, v in d.items() if k not in known})


def read_tasks(path: str | Path) -> list[Task]:
    """Read a JSONL task file; raises ValueError naming the file and line on bad input."""
    tasks = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            tasks.append(Task.from_json(json.loads(line)))
        except (ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}:{i}: {e}") from None
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks


def write_tasks(path: str | Path, tasks: Iterable[Task]) -> None:
    Path(path).write_text("".join(json.dumps(t.to_json()) + "\n" for t in tasks))



def parse_task(text: str, max_count: int = 6, max_value: int = 10_000) -> Task | None:
    """Parse the tiny format `3 7 25>21` (as written by the tutor's mutate turn); None if malformed."""
    m = re.fullmatch(r"\s*((?:\d{1,5} ){1,%d}\d{1,5})>(\d{1,6})\s*" % (max_count - 1), text or "")
    if not m:
        return None
    nums = [int(x) for x in m[1].split()]
    if not all(0 < x <= max_value for x in nums) or int(m[2]) <= 0:
        return None
    return Task(nums, int(m[2]))

