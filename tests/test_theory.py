"""The theory constants of definitions.md (``gscfast.theory``), checked by quadrature."""

from __future__ import annotations

import pytest

from gscfast import theory


def test_r_s_by_quadrature_matches_definitions():
    for act, value in theory.R_S.items():
        assert theory.r_s(act) == pytest.approx(value, abs=6e-4)


def test_r_s_names_an_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'swish'.*relu"):
        theory.r_s("swish")
