"""The one choice check: its message, its prefix and its error class."""

import pytest

from lossatlas.checks import check_choice
from lossatlas.errors import UserError
from lossatlas.estimators import _checks
from lossatlas.probes import settings


def test_check_choice_returns_the_value_and_names_every_choice():
    assert check_choice("loss", "mse", ("cross_entropy", "mse")) == "mse"
    assert check_choice("k", 2, range(1, 4)) == 2
    with pytest.raises(ValueError, match=r"^unknown loss 'hinge'; choose one of cross_entropy, mse$"):
        check_choice("loss", "hinge", ("cross_entropy", "mse"))
    with pytest.raises(ValueError, match=r"^unknown k 7; choose one of 1, 2, 3$"):
        check_choice("k", 7, range(1, 4))


def test_check_choice_prefix_and_error_class():
    with pytest.raises(UserError, match=r"^hessian: unknown loss \(--loss\) 'x'; choose one of a, b$") as info:
        check_choice("loss (--loss)", "x", ("a", "b"), prefix="hessian: ", error=UserError)
    assert type(info.value) is UserError
    with pytest.raises(ValueError) as plain:
        check_choice("mode", "training", ("eval", "train"))
    assert not isinstance(plain.value, UserError)


def test_one_definition_is_shared():
    assert _checks.check_choice is check_choice and settings.check_choice is check_choice
