"""The bootstrap corpus: arithmetic facts and their shuffled control, and the default base's cache key."""

import hashlib
import json
import random
import re

from selfplay.bootstrap import ADDED, FORMAT_VERSION, KIND_WEIGHTS, arith_example, base_dir, kind_weights
from selfplay.config import BootstrapCfg


def _value(expr: str) -> int | None:
    """a op b by hand; None for a division with a remainder (never a fact)."""
    a, op, b = re.fullmatch(r"(\d+)([-+*/])(\d+)", expr).groups()
    a, b = int(a), int(b)
    if op == "/" and a % b:
        return None
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def test_arithmetic_facts_are_true_and_the_control_shows_other_values():
    # E:a op b= -> the exact value (whole, 0..1000: a division only when it leaves no remainder, a
    # subtraction only when not negative); e.g. E:25-7= -> 18, E:24/2= -> 12. The control draws
    # each value from another fact, so it is wrong on most facts but has the same values' range.
    cfg, rng = BootstrapCfg(arith_fraction=0.2), random.Random(0)
    facts = [arith_example(rng, cfg) for _ in range(300)]
    for prompt, value in facts:
        assert int(value) == _value(re.fullmatch(r"E:(.+)=", prompt).group(1)) and 0 <= int(value) <= 1000
    assert {re.search(r"[-+*/]", p).group() for p, _ in facts} == set("+-*/")  # all four operators appear
    rng = random.Random(1)
    control = [arith_example(rng, BootstrapCfg(arith_fraction=0.2, arith_shuffled=True)) for _ in range(300)]
    wrong = sum(int(v) != _value(p[2:-1]) for p, v in control)
    assert wrong >= 250 and all(0 <= int(v) <= 1000 for _, v in control)


def test_default_corpus_and_cache_key_are_unchanged_by_the_arithmetic_fields():
    # At arith_fraction 0 the turn kinds keep their weights and `arith` comes last with weight 0, so
    # rng.choices draws the same kinds as before the field existed; the cache key is the format-5
    # key without the added fields, so bases built before stay valid.
    assert kind_weights(BootstrapCfg()) == {**KIND_WEIGHTS, "arith": 0.0}
    cfg = BootstrapCfg()
    old = {k: v for k, v in cfg.model_dump().items() if k not in ADDED}
    digest = hashlib.sha1(json.dumps({"v": FORMAT_VERSION, **old}, sort_keys=True).encode()).hexdigest()[:10]
    assert base_dir(cfg, "/c").name == f"tiny-{digest}"
    assert base_dir(BootstrapCfg(arith_fraction=0.2), "/c") != base_dir(cfg, "/c")
    assert base_dir(BootstrapCfg(arith_fraction=0.2, arith_shuffled=True), "/c") != base_dir(BootstrapCfg(arith_fraction=0.2), "/c")
