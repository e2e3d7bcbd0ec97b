import pytest

from theseus_deploy.errors import UsageError
from theseus_deploy.schedulers import make_scheduler


def test_linear_from_steps_to_full():
    s = make_scheduler("linear", 0.3, steps_to_full=7)
    assert s.k == pytest.approx(0.1)
    assert [round(s(t), 6) for t in (0, 1, 3, 6, 7, 100)] == [0.3, 0.4, 0.6, 0.9, 1.0, 1.0]
    assert s.steps_to_full == 7


def test_linear_from_k():
    s = make_scheduler("linear", 0.5, k=0.01)
    assert s(0) == 0.5 and s(25) == pytest.approx(0.75) and s(50) == 1.0 and s(51) == 1.0


def test_constant_then_one():
    s = make_scheduler("constant", 0.3, steps_to_full=5)
    assert [s(t) for t in (0, 4, 5, 9)] == [0.3, 0.3, 1.0, 1.0]


def test_anti_curriculum_decreases_then_successor_alone():
    s = make_scheduler("anti", 0.3, steps_to_full=7)
    assert [round(s(t), 6) for t in (0, 1, 3, 6, 7, 50)] == [1.0, 0.9, 0.7, 0.4, 1.0, 1.0]


@pytest.mark.parametrize("kwargs,msg", [
    (dict(kind="cosine", replacing_rate=0.3, steps_to_full=5), "unknown scheduler"),
    (dict(kind="linear", replacing_rate=1.5, steps_to_full=5), "replacing-rate"),
    (dict(kind="linear", replacing_rate=0.3, steps_to_full=5, k=0.1), "either"),
    (dict(kind="linear", replacing_rate=0.3, steps_to_full=0), "steps-to-full"),
    (dict(kind="linear", replacing_rate=0.3, k=-1.0), "--k"),
])
def test_bad_values(kwargs, msg):
    with pytest.raises(UsageError, match=msg):
        make_scheduler(**kwargs)


@pytest.mark.parametrize("kind", ["linear", "constant", "anti"])
def test_successor_only_phase_starts_where_p_is_one_for_good(kind):
    s = make_scheduler(kind, 0.3, k=0.3)  # (1 - b) / k = 2.33: p first reaches 1 at step 3
    assert s.steps_to_full == 3
    assert [s.successor_only(t) for t in range(5)] == [False, False, False, True, True]
    assert all(s(t) == 1.0 for t in range(3, 10))
    assert s(0) == (1.0 if kind == "anti" else 0.3)  # anti starts at 1, yet is still replacing
