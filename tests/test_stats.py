"""Paired bootstrap statistics (avatarforcing/stats.py) on synthetic data with known effects."""
import numpy as np
import pytest

from avatarforcing import AvatarForcingError
from avatarforcing.stats import (DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, bootstrap_mean_ci, column, compare,
                                       expanded_tail, higher_is_better, paired_differences, verdict)


def paired(n, effect, noise=1.0, seed=0, spread=5.0):
    """Two arms over n cases: b = per-case level + noise, a = b + effect (+ independent noise)."""
    rng = np.random.default_rng(seed)
    level = spread * rng.normal(size=n)                  # large between-case spread: pairing must remove it
    b = level + rng.normal(size=n)
    a = b + effect + noise * rng.normal(size=n)
    return dict(enumerate(a)), dict(enumerate(b))


def test_known_effect_is_detected_in_the_metric_direction():
    a, b = paired(10, effect=2.0)
    up = compare(a, b, "csim_last")                      # higher is better: a is better
    assert up.verdict == HOLDS and up.ci_low > 0 and up.n_cases == 10
    assert up.effect == pytest.approx(np.mean(list(a.values())) - np.mean(list(b.values())))
    down = compare(a, b, "fid_total")                    # lower is better: a is worse
    assert down.verdict == DOES_NOT_HOLD and down.ci_high < 0
    assert down.effect == pytest.approx(-up.effect) and (down.mean_a, down.mean_b) == (up.mean_a, up.mean_b)


def test_null_effect_is_not_detected_despite_case_spread():
    a, b = paired(10, effect=0.0, seed=3)
    c = compare(a, b, "adj_feat_total")
    assert c.verdict == INCONCLUSIVE and c.ci_low < 0 < c.ci_high
    same = compare(b, b, "csim_total")                   # identical arms: a zero-width interval at 0
    assert (same.effect, same.ci_low, same.ci_high, same.verdict) == (0.0, 0.0, 0.0, INCONCLUSIVE)


def test_pairing_matters():
    # The effect (0.5) is small against the spread between cases (5) but large against the within-case noise:
    # the paired comparison sees it.
    a, b = paired(12, effect=0.5, noise=0.2, seed=1)
    assert compare(a, b, "csim_total").verdict == HOLDS
    assert np.ptp(list(b.values())) > 5


@pytest.mark.parametrize("expanded, low, high", [(True, 0.92, 0.98), (False, 0.85, 0.94)])
def test_interval_coverage(expanded, low, high):
    """Over many synthetic data sets of 10 cases (heavy-tailed differences), the expanded 95 % interval covers
    the true effect about 95 % of the time; the plain percentile interval only about 90 % (why it is expanded)."""
    rng = np.random.default_rng(7)
    sets = 400
    hits = 0
    for i in range(sets):
        x = 0.3 + rng.standard_t(df=5, size=10)
        _, lo, hi = bootstrap_mean_ci(x, resamples=2000, seed=i, expanded=expanded)
        hits += lo <= 0.3 <= hi
    assert low <= hits / sets <= high


def test_expansion_vanishes_with_many_cases():
    assert expanded_tail(10) == pytest.approx(0.00855, abs=1e-4)         # per side; plain: 0.025
    assert expanded_tail(10) < expanded_tail(40) < expanded_tail(10_000) == pytest.approx(0.025, abs=1e-4)


def test_bootstrap_is_reproducible_and_widens_with_noise():
    x = np.random.default_rng(0).normal(1.0, 1.0, size=10)
    assert bootstrap_mean_ci(x) == bootstrap_mean_ci(x)
    _, lo1, hi1 = bootstrap_mean_ci(x)
    _, lo2, hi2 = bootstrap_mean_ci(3 * x)
    assert hi2 - lo2 == pytest.approx(3 * (hi1 - lo1))


def test_verdicts_and_directions():
    assert verdict(0.1, 0.5) == HOLDS and verdict(-0.5, -0.1) == DOES_NOT_HOLD and verdict(-0.1, 0.1) == INCONCLUSIVE
    assert verdict(0.0, 0.3) == INCONCLUSIVE
    assert higher_is_better("csim_last") and higher_is_better("sync_conf_total")
    assert not any(higher_is_better(m) for m in ("delta_e_last", "adj_feat_total", "sync_dist_total", "fid_total",
                                                   "sync_offset_last", "adj_pixel_total"))
    assert paired_differences({0: 1.0, 1: 2.0}, {0: 3.0, 1: 0.0}, "fid_total").tolist() == [2.0, -2.0]


def test_bad_input_is_a_one_line_error():
    with pytest.raises(AvatarForcingError, match="no known direction") as err:
        higher_is_better("sharpness")
    assert "\n" not in str(err.value)
    with pytest.raises(AvatarForcingError, match="different cases"):
        compare({0: 1.0, 1: 2.0}, {0: 1.0, 2: 2.0}, "csim_total")
    with pytest.raises(AvatarForcingError, match=">= 2 finite"):
        bootstrap_mean_ci([1.0])
    with pytest.raises(AvatarForcingError, match=">= 2 finite"):
        bootstrap_mean_ci([1.0, float("nan")])
    with pytest.raises(AvatarForcingError, match="at least 2000"):
        bootstrap_mean_ci([1.0, 2.0], resamples=100)
    with pytest.raises(AvatarForcingError, match="no finite 'fid_total'"):
        column({0: {"fid_total": float("nan")}}, "fid_total")
