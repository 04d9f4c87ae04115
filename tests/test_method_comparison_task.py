"""The arithmetic task of benchmarks/method_comparison.py: answers right, splits disjoint, scoring as GSM8K's."""

import importlib.util
import os
import re

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def mc():
    path = os.path.join(HERE, "..", "benchmarks", "method_comparison.py")
    spec = importlib.util.spec_from_file_location("method_comparison_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _evaluate(work: str) -> int:
    """Check every ``a op b = c.`` step of a worked answer independently; return the last result."""
    result = None
    for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", work):
        a, b, c = int(a), int(b), int(c)
        expected = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        assert c == expected, work
        if op == "/":
            assert a % b == 0, work
        result = c
    return result


def test_answers_are_right_and_end_with_the_number(mc):
    rows = mc.make_problems(600, seed=3)
    assert len({r["question"] for r in rows}) == 600
    for r in rows:
        assert r["answer"].endswith(f"The answer is {r['number']}.")
        assert _evaluate(r["answer"]) == r["number"]
        assert r["number"] > 0
    # every template is used, in turn
    assert len({mc.TEMPLATES[i % len(mc.TEMPLATES)] for i in range(len(rows))}) == 6


def test_split_is_deterministic_and_held_out(mc):
    train, test = mc.split(960, 120)
    train2, test2 = mc.split(960, 120)
    assert train == train2 and test == test2
    assert len(train) == 960 and len(test) == 120
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    # a larger training split starts with the smaller one's problems (budgets nest), the test split is fixed
    bigger, test3 = mc.split(1200, 120)
    assert test3 == test and bigger[:960] == train
    assert not {r["question"] for r in bigger} & {r["question"] for r in test}


@pytest.mark.parametrize("text, number", [
    ("3 * 4 = 12. The answer is 12.", 12),
    ("The answer is 1,234.", 1234),
    ("12 - 20 = -8. The answer is -8", -8),
    ("no number here", None),
    ("5 + 5 = 10. The answer is 10. Then 7", 7),  # the last number counts, as in GSM8K's scoring
])
def test_last_number(mc, text, number):
    assert mc.last_number(text) == number


def test_bad_jobs_is_refused(mc):
    with pytest.raises(SystemExit, match="--jobs must be at least 1, got 0"):
        mc.run_rows(["base model"], [], 0)
