import pytest

from lossatlas.analysis.steps import select_steps
from lossatlas.errors import UserError

STEPS = [0, 5, 10, 15, 20, 100]


@pytest.mark.parametrize("spec, expected", [
    ("all", STEPS), ("last", [100]), ("first", [0]), ("10", [10]), (10, [10]), ("5,15", [5, 15]),
    ("0:20:10", [0, 10, 20]), ("5:", [5, 10, 15, 20, 100]), (":10", [0, 5, 10]), ("0:100:50", [0, 100]),
    ([15, 5], [5, 15]), (None, [100]),
])
def test_select_steps(spec, expected):
    assert select_steps(spec, STEPS) == expected


@pytest.mark.parametrize("spec, match", [
    ("7", "step 7 is not in the run"), ("a:b", "malformed step selection"), ("0:10:0", "malformed"),
    ("1:4", "matches none"), ("1:2:3:4", "malformed"), ("", "empty step selection"),
])
def test_bad_selection(spec, match):
    with pytest.raises(UserError, match=match):
        select_steps(spec, STEPS)


def test_empty_run():
    with pytest.raises(UserError, match="no checkpoints"):
        select_steps("all", [])
