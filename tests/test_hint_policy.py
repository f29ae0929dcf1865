"""bench/hint_policy.py: what a learned tutor reveals, read from a real SQLite episode store, against
counts and correlations worked out by hand."""

import re
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from hint_policy import hint_policy  # noqa: E402


def test_hint_policy_by_hand(tmp_path):
    con = sqlite3.connect(tmp_path / "memory.db")
    con.execute("create table turns (iteration int, kind text, prompt text, parsed text)")
    con.executemany("insert into turns values (?, ?, ?, ?)", [
        (1, "hint", "H:1 2 3>6|X:1+2|R:1+2+3|", "1"),  # before --from: not read
        (2, "attempt", "S:1 2 3>6|", "1+2+3"),  # not a hint
        (2, "hint", "H:1 2 3>6|X:1+2|R:1+2+3|", "4"),  # 5 tokens, 4 shown: withholds 1; attempt prefix 3/5
        (2, "hint", "H:1 2 3>6|X:3*2|R:1+2+3|", "9"),  # more than the solution: the whole (withholds 0); prefix 0
        (3, "hint", "H:2 5>7|X:5+2|R:2+5|", "x"),  # not a number: the graph shows nothing (empty); prefix 0
        (3, "hint", "H:2 5>10|X:2*4|R:2*5|", "2"),  # 3 tokens, 2 shown: withholds 1; prefix 2/3
    ])
    con.commit()
    con.close()
    row = hint_policy(tmp_path, 2, lambda s: re.findall(r"\d+|.", s))
    # shares of 4 hints: k=0 1/4, k=1 2/4, k=2 and k=3 none (the empty hint withholds its 3 tokens,
    # counted as empty, not as k=3), k>=4 none, empty 1/4
    assert row[1:8] == ["4", "0.25", "0.50", "0.00", "0.00", "0.00", "0.25"]
    # lengths 5 5 3 3, counts 4 5 0 2: deviations (1 1 -1 -1) and (1.25 2.25 -2.75 -0.75) give
    # 7.0 / (2 * sqrt(14.75)) = 0.911
    assert row[8] == "0.91"
    # prefix shares .6 0 0 .667 against revealed .8 1 0 .667: 0.1433 / (0.6351 * 0.7506) = 0.301
    assert row[9] == "0.301 (prefix 0.32)"
    # with the length held fixed: r(prefix, length) = -0.0667 / (0.6351 * 2) = -0.0525 and
    # r(revealed, length) = 1.1333 / (0.7506 * 2) = 0.7550, so
    # (0.3007 + 0.0525 * 0.7550) / sqrt((1 - 0.0028) * (1 - 0.5700)) = 0.3403 / 0.6548 = 0.520
    assert row[10] == "0.520"
