from __future__ import annotations

import math

import pytest

from hpo.results.stats import mcnemar_exact, ranks, spearman


def test_mcnemar_exact_matches_known_values():
    # 1 against 9 disagreements: 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024 (statsmodels' mcnemar(exact=True)).
    assert mcnemar_exact(1, 9) == pytest.approx(0.021484375, abs=1e-12)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)  # symmetric
    assert mcnemar_exact(5, 5) == 1.0  # an even split is capped at 1
    assert mcnemar_exact(0, 0) == 1.0  # no disagreement, no evidence
    # 30 against 60 on 10,000 test images: p = 0.00202 (binomial lower tail doubled)
    assert mcnemar_exact(30, 60) == pytest.approx(0.0020, abs=1e-4)


def test_spearman_of_known_rankings():
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 9]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # One swap among five: 1 - 6 * 2 / (5 * 24) = 0.9
    assert spearman([1, 2, 3, 4, 5], [1, 2, 3, 5, 4]) == pytest.approx(0.9)
    assert ranks([0.9, 0.8, 0.9]) == [2.5, 1.0, 2.5]
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
