import json

from selfplay.curriculum import Curriculum
from selfplay.domains.countdown import Task
from tests.conftest import tiny_config


def _cur(**sets):
    return Curriculum(tiny_config(**sets), heldout=set())


def test_mix_and_held_out_exclusion():
    c = _cur(**{"curriculum.episodes_per_iter": 16, "curriculum.mutate_group": 2})
    first = c.next(1)
    assert len(first) == 16 and all(a.mutate_group is None for a in first)  # empty pool: all fresh
    for a in first:
        c.update(a.task, 8, 1, 1)
    second = c.next(2)
    # 8 fresh, 4 replayed, 4 mutation episodes in 2 groups of 2 siblings sharing a parent
    assert len(second) == 16
    groups = [a.mutate_group for a in second if a.mutate_group]
    assert len(groups) == 4 and len(set(groups)) == 2
    held = {t.key for t in (a.task for a in first)}
    c2 = Curriculum(tiny_config(), heldout=held)
    assert not {a.task.key for a in c2.next(1)} & held


def test_plr_prefers_learnable_tasks():
    c = _cur(**{"curriculum.staleness": 0.0})
    learnable, solved, hopeless = Task([1, 2, 3], 6, id="l"), Task([1, 2, 3], 5, id="s"), Task([1, 2, 3], 7, id="h")
    c.update(learnable, 100, 50, 1)  # p = 0.5: the most learning potential
    c.update(solved, 100, 100, 1)
    c.update(hopeless, 100, 0, 1)
    picks = [t.id for t in c._pick(2000, 2)]
    assert picks.count("l") > 0.8 * len(picks)


def test_programmatic_mutations_when_the_tutor_does_not_mutate():
    c = Curriculum(tiny_config(**{"graph.mutate": False}), heldout=set())
    for a in c.next(1):
        c.update(a.task, 8, 2, 1)
    muts = [a for a in c.next(2) if a.task.source.startswith("mutate:")]
    assert muts and all(a.mutate_group is None and a.task.parent for a in muts)


def test_checkpoint_state_reproduces_the_next_iteration():
    a = _cur()
    for x in a.next(1):
        a.update(x.task, 8, 3, 1)
    state = json.loads(json.dumps(a.state()))  # it must survive JSON
    b = _cur()
    b.load(state)
    assert [x.task.to_json() for x in a.next(2)] == [x.task.to_json() for x in b.next(2)]


def test_mutations_are_never_mutated_again():
    c = _cur()
    fresh, child = Task([1, 2, 3], 6, id="f"), Task([1, 2, 4], 7, id="f/c", parent="f", source="tutor")
    c.update(fresh, 100, 90, 1)  # low learning potential
    c.update(child, 100, 50, 1)  # the most learnable, but a mutation
    assert {t.id for t in c._pick(200, 2, parents=True)} == {"f"}
    assert "f/c" in {t.id for t in c._pick(200, 2)}  # replay still plays it


def test_a_full_pool_evicts_the_least_learnable_then_stalest_before_the_next_iteration():
    c = _cur(**{"curriculum.pool_size": 4})
    # learnability p(1-p) with p = (solved + 1) / (attempts + 2), 8 attempts each:
    #   c: p = 1/10 -> 0.09 (last played at iteration 2)    b: p = 9/10 -> 0.09 (iteration 1)
    #   a, e: p = 5/10 -> 0.25    d: p = 3/10 -> 0.21
    for tid, solved, it in (("c", 0, 2), ("b", 8, 1), ("a", 4, 2), ("d", 2, 2), ("e", 4, 2)):
        c.update(Task([1, 2, 3], 6, id=tid), 8, solved, it)
    assert len(c.pool) == 5  # updates never scan the pool; the next iteration trims it
    c.next(3)
    # one over: b and c tie as least learnable; b, played longer ago, goes
    assert sorted(c.pool) == ["a", "c", "d", "e"]
