"""What a learned tutor reveals (`graph.hint_form: reveal`), read from runs' episode stores: per
run, the share of hints that withhold 0 (the whole solution), 1, 2, 3 or more of the solution's
tokens, or all of them (an empty hint); and what the revealed count follows: the solution's length
(correlation of the count with it), or the failed attempt the tutor was shown (correlation of the
revealed share with the share of the solution the attempt already wrote: their common token
prefix; and that correlation with the solution's length held fixed, since both shares depend on
it). Hint turns from iteration --from on; prompts in the tiny format (prompts/tiny/hint_*.j2),
tokens as the run's tokenizer cuts them, so the counts are the graph's.

    python bench/hint_policy.py RUN_DIR [RUN_DIR ...] [--from 801]
"""
import argparse
import re
import sqlite3
import statistics
import sys
from pathlib import Path

PROMPT = re.compile(r"H:([\d ]+)>(\d+)\|(?:X:(.*)\|)?R:(.*)\|$")  # hint_step.j2, hint_noattempt.j2


def corr(xs: list[float], ys: list[float]) -> float:
    """Pearson's r; NaN where one side is constant (a tutor that always writes the same count)."""
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:
        return float("nan")


def partial_corr(xs: list[float], ys: list[float], zs: list[float]) -> float:
    """The correlation of xs and ys with zs held fixed (both regressed on zs linearly)."""
    rxy, rxz, ryz = corr(xs, ys), corr(xs, zs), corr(ys, zs)
    denom = ((1 - rxz ** 2) * (1 - ryz ** 2)) ** 0.5
    return (rxy - rxz * ryz) / denom if denom else float("nan")


def common_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def hint_policy(run: Path, first: int, tokens) -> list[str]:
    con = sqlite3.connect(f"file:{run / 'memory.db'}?mode=ro", uri=True)
    turns = con.execute("select prompt, parsed from turns where kind = 'hint' and iteration >= ?", (first,)).fetchall()
    con.close()
    withheld, counts, lengths, shares, prefixes = [], [], [], [], []
    for prompt, parsed in turns:
        m = PROMPT.match(prompt)
        if m is None:
            sys.exit(f"{run}: a hint prompt not in the tiny format: {prompt[:60]!r}")
        attempt, solution = m.group(3), tokens(m.group(4))
        k = min(int(parsed), len(solution)) if (parsed or "").isdigit() else 0  # as the graph cuts it
        withheld.append(len(solution) - k)
        counts.append(k)
        lengths.append(len(solution))
        shares.append(k / len(solution))
        if attempt is not None:
            prefixes.append(common_prefix(tokens(attempt), solution) / len(solution))
    if not turns:
        return [str(run), "0"] + ["–"] * 9
    n = len(turns)
    empty = [w == L for w, L in zip(withheld, lengths)]  # nothing revealed: not a count of withheld tokens
    share = [sum(w == x and not e for w, e in zip(withheld, empty)) / n for x in (0, 1, 2, 3)]
    empty = sum(empty) / n
    return [str(run), str(n), *(f"{x:.2f}" for x in share), f"{1 - sum(share) - empty:.2f}", f"{empty:.2f}",
            f"{corr(lengths, counts):.2f}",
            f"{corr(prefixes, shares):.3f} (prefix {sum(prefixes) / n:.2f})" if prefixes else "– (not shown)",
            f"{partial_corr(prefixes, shares, lengths):.3f}" if prefixes else "–"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--from", dest="first", type=int, default=1, help="first iteration read")
    a = p.parse_args()
    from common import table

    from selfplay.config import load_config
    from selfplay.policy import ensure_base
    from selfplay.tokenizer import load_tokenizer

    rows = []
    for run in a.runs:
        if not (run / "memory.db").is_file() or not (run / "config.yaml").is_file():
            sys.exit(f"{run}: not a run dir (memory.db and config.yaml expected)")
        cfg = load_config(run / "config.yaml")
        if cfg.graph.hint_source != "tutor" or cfg.graph.hint_form != "reveal":
            sys.exit(f"{run}: its hints are not a learned tutor's token counts (graph.hint_source tutor, hint_form reveal)")
        tok = load_tokenizer(ensure_base(cfg))
        rows.append(hint_policy(run, a.first, lambda s: tok(s, add_special_tokens=False)["input_ids"]))
    table(f"hints from iteration {a.first} on: share withholding k of the solution's tokens; what the revealed count follows",
          ["run", "hints", "k=0 (whole)", "k=1", "k=2", "k=3", "k≥4", "all (empty)", "corr(length, count)",
           "corr(attempt's prefix, revealed share)", "the same, length held fixed"], rows)


if __name__ == "__main__":
    main()
