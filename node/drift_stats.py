"""Per-feature drift tests, chosen as Evidently chooses them by default.

For each feature (a column of a tabular input, or a text statistic), with the
reference = the version's training baseline and current = the live window:

| distinct values (ref + live) | reference <= 1000 rows      | reference > 1000 rows         |
|------------------------------|-----------------------------|-------------------------------|
| more than 5                  | `ks`: two-sample KS, p-value| `wasserstein` / ref std       |
| 3 to 5                       | `chisquare`: p-value (*)    | `jensenshannon` distance      |
| 1 or 2                       | `z`: two-proportion z-test  | `jensenshannon` distance      |

(*) as a two-sample test of homogeneity, where Evidently uses goodness of fit against
the reference shares (see `_chisquare` for why).

p-values drift when below `alpha / n_features` (Bonferroni, as alibi-detect does:
the family-wise false-alarm rate of a model stays at or below `alpha`); distances
drift at or above 0.1 (Evidently's defaults; no correction applies to distances).

Missing values (NaN, and other non-finite values) are not part of the value tests
above; a column where upstream starts losing values must still raise an alarm. So
when either sample has missing values in a feature, its missing share is tested
against the reference's too, as a result of its own (`<feature> missing`, test
`missing`: Fisher's exact test on the 2 x 2 table of present and missing counts, a
two-proportion test that holds for the small counts a rare missing value gives).
These p-values count in the Bonferroni correction. A live column that is entirely
missing is drift whatever the test says (its values cannot be tested at all).

Predictions (the default output of the model on the same requests) are one more
feature, named `prediction_feature(output)` = `<prediction: OUTPUT>`, tested by the
same rules with one difference: class labels and strings are nominal, so a
`categorical` column is tested as categories (`z` for two classes, else `chisquare`;
`jensenshannon` for large references) whatever its number of classes, never with KS
on arbitrary codes. Numeric outputs (regression, probabilities) follow the table.
The prediction counts in the Bonferroni family: the model's flag ("any feature
drifted", the one alerts page on) is over inputs and prediction together, and it
keeps its family-wise false-alarm rate at `alpha` only if every p-value behind it
shares the correction. It costs little: one more test in the divisor.

Why these and not one test for all: KS is exact and sensitive on small references
but flags negligible shifts once both samples are large, so large references use an
effect size (a normalised distance) instead; few-valued features are categories,
where KS's continuity assumption does not hold.

Charts get histograms whose bins come from the reference only, so a chart never
reveals an individual live value (a live outlier lands in the outermost bin). Below
the minimum window there are no live histograms at all (`untested`): shares of a
handful of rows would pin the values of single requests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import stats
from scipy.spatial import distance

__all__ = [
    "ALPHA",
    "DISTANCE_THRESHOLD",
    "MISSING_SUFFIX",
    "PREDICTION_PREFIX",
    "Column",
    "FeatureResult",
    "choose_test",
    "compare",
    "compare_columns",
    "prediction_feature",
    "untested",
]

ALPHA = 0.05
DISTANCE_THRESHOLD = 0.1
SMALL_REFERENCE = 1000
FEW_VALUES = 5
BINS = 20
_EPS = 1e-4  # Evidently fills empty categories with this share before Jensen-Shannon

Floats = npt.NDArray[np.float64]
ScoreKind = Literal["p_value", "distance"]
_KINDS: dict[str, ScoreKind] = {
    "ks": "p_value",
    "chisquare": "p_value",
    "z": "p_value",
    "wasserstein": "distance",
    "jensenshannon": "distance",
    "missing": "p_value",
}
MISSING_SUFFIX = " missing"
PREDICTION_PREFIX = "<prediction: "


def prediction_feature(output: str, column: int | None = None) -> str:
    """The feature name of the predictions in output `output` (of its `column` when
    only one column of a 2-D output is compared): `<prediction: label>`."""
    suffix = "" if column is None else f"[{column}]"
    return f"{PREDICTION_PREFIX}{output}{suffix}>"


@dataclass(frozen=True)
class Column:
    """One feature to test: its reference (training) values and its live values, or
    None for no verdict (too few live values: see `untested`). `categorical`: the
    values are nominal (class labels), tested as categories however many there are."""

    name: str
    reference: npt.NDArray[Any]
    current: npt.NDArray[Any] | None
    categorical: bool = False


@dataclass(frozen=True)
class FeatureResult:
    """One feature's verdict, with the histograms a chart needs."""

    feature: str
    test: str
    score_kind: ScoreKind
    statistic: float  # NaN: no verdict (not enough data)
    threshold: float
    drift: bool
    bin_edges: tuple[float, ...] = ()
    reference_shares: tuple[float, ...] = ()
    current_shares: tuple[float, ...] = ()
    categorical: bool = False


def _finite(values: Any) -> Floats:
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def _missing(values: Any) -> int:
    """How many of `values` are missing (NaN or otherwise not finite)."""
    return int((~np.isfinite(np.asarray(values, dtype=np.float64).ravel())).sum())


def _missing_p(ref_missing: int, ref_rows: int, cur_missing: int, cur_rows: int) -> float:
    """Fisher's exact test: is the live missing share the reference's?"""
    table = [[ref_missing, ref_rows - ref_missing], [cur_missing, cur_rows - cur_missing]]
    return float(stats.fisher_exact(table).pvalue)


def _missing_result(
    name: str, threshold: float, missing: tuple[int, int], rows: tuple[int, int], *, score: bool
) -> FeatureResult:
    """The missing-share verdict of feature `name` (no verdict when not `score`).
    Chart: category 0 = present, 1 = missing."""
    (ref_missing, cur_missing), (ref_rows, cur_rows) = missing, rows
    p = math.nan
    drift = False
    if score and ref_rows and cur_rows:
        p = _missing_p(ref_missing, ref_rows, cur_missing, cur_rows)
        all_missing = cur_missing == cur_rows and ref_missing < ref_rows
        drift = all_missing or p < threshold

    def shares(missing: int, total: int) -> tuple[float, ...]:
        return (1 - missing / total, missing / total, 0.0) if total else ()

    return FeatureResult(
        feature=name + MISSING_SUFFIX,
        test="missing",
        score_kind="p_value",
        statistic=p,
        threshold=threshold,
        drift=drift,
        bin_edges=(0.0, 1.0),
        reference_shares=shares(ref_missing, ref_rows),
        current_shares=shares(cur_missing, cur_rows) if score else (),
        categorical=True,
    )


def choose_test(reference: Floats, current: Floats, *, categorical: bool = False) -> str:
    """Evidently's default test for a column (see the module table); a `categorical`
    column gets a category test whatever its number of values."""
    n_values = len(np.unique(np.concatenate([reference, current])))
    few = categorical or n_values <= FEW_VALUES
    if len(reference) > SMALL_REFERENCE:
        return "jensenshannon" if few else "wasserstein"
    if few:
        return "chisquare" if n_values > 2 else "z"
    return "ks"


def _chisquare(reference: Floats, current: Floats) -> float:
    """Chi-square test of homogeneity on the 2 x k table of counts.

    Evidently tests the live counts against the reference shares as if those shares
    were exact (a goodness-of-fit test). They are estimates from a finite sample, and
    ignoring their noise over-alarms: on seeded trials from the training distribution
    (tests/test_drift.py) that form flagged a 3-valued feature in 16% of windows at
    a nominal 5/6%. The two-sample form accounts for both samples' noise.
    """
    keys = np.unique(np.concatenate([reference, current]))
    table = np.array(
        [[(sample == k).sum() for k in keys] for sample in (reference, current)],
        dtype=np.float64,
    )
    return float(stats.chi2_contingency(table, correction=False).pvalue)


def _z(reference: Floats, current: Floats) -> float:
    key = np.unique(np.concatenate([reference, current]))[0]
    p1, p2 = float(np.mean(reference == key)), float(np.mean(current == key))
    n1, n2 = len(reference), len(current)
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    spread = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if spread <= 0:
        return 1.0  # one value everywhere: nothing differs
    z = (p1 - p2) / math.sqrt(spread)
    return float(2 * stats.norm.sf(abs(z)))


def _category_shares(values: Floats, keys: Floats) -> Floats:
    counts = np.array([(values == k).sum() for k in keys], dtype=np.float64)
    return counts / max(1, len(values))


def _jensenshannon(reference: Floats, current: Floats) -> float:
    keys = np.unique(np.concatenate([reference, current]))
    ref = np.where((s := _category_shares(reference, keys)) == 0, _EPS, s)
    cur = np.where((s := _category_shares(current, keys)) == 0, _EPS, s)
    return float(distance.jensenshannon(ref, cur))


def _wasserstein(reference: Floats, current: Floats) -> float:
    norm = max(float(np.std(reference)), 0.001)
    return float(stats.wasserstein_distance(reference, current) / norm)


def _score(test: str, reference: Floats, current: Floats) -> float:
    if test == "ks":
        return float(stats.ks_2samp(reference, current).pvalue)
    if test == "chisquare":
        return _chisquare(reference, current)
    if test == "z":
        return _z(reference, current)
    if test == "wasserstein":
        return _wasserstein(reference, current)
    return _jensenshannon(reference, current)


def _histogram(
    reference: Floats, current: Floats, categorical: bool = False
) -> tuple[Floats, Floats, Floats, bool]:
    """Bin edges (from the reference), reference and current shares, categorical?"""
    keys = np.unique(reference)
    if categorical or len(keys) <= FEW_VALUES:
        ref = _category_shares(reference, keys)
        cur = _category_shares(current, keys)
        other = 1.0 - float(cur.sum()) if len(current) else 0.0  # live values unseen in training
        return keys, np.append(ref, 0.0), np.append(cur, max(0.0, other)), True
    lo, hi = float(keys[0]), float(keys[-1])
    edges = np.linspace(lo, hi, BINS + 1)
    ref, _ = np.histogram(reference, bins=edges)
    cur, _ = np.histogram(np.clip(current, lo, hi), bins=edges)
    return (
        edges,
        ref / max(1, len(reference)),
        cur / max(1, len(current)),
        False,
    )


def _result(
    name: str,
    test: str,
    score: float,
    threshold: float,
    reference: Floats,
    current: Floats,
    *,
    live: bool = True,
    categorical: bool = False,
) -> FeatureResult:
    kind = _KINDS[test]
    drift = not math.isnan(score) and (
        score < threshold if kind == "p_value" else score >= threshold
    )
    edges, ref, cur, categorical = _histogram(reference, current, categorical)
    return FeatureResult(
        feature=name,
        test=test,
        score_kind=kind,
        statistic=score,
        threshold=threshold,
        drift=bool(drift),
        bin_edges=tuple(float(e) for e in edges),
        reference_shares=tuple(float(v) for v in ref),
        current_shares=tuple(float(v) for v in cur) if live else (),
        categorical=categorical,
    )


def _threshold(test: str, n_tests: int, alpha: float) -> float:
    return alpha / max(1, n_tests) if _KINDS[test] == "p_value" else DISTANCE_THRESHOLD


def compare_columns(columns: Sequence[Column], *, alpha: float = ALPHA) -> list[FeatureResult]:
    """Test each column's live values against its reference, and its missing share
    where either has missing values (see the module docstring); each missing-share
    result follows its feature's. A column without live values (`current` None) gets
    no verdict, as in `untested`. Every column and missing-share test counts in the
    Bonferroni correction, whether or not it has a verdict this time."""
    missing = [
        (_missing(c.reference), 0 if c.current is None else _missing(c.current)) for c in columns
    ]
    n_tests = len(columns) + sum(1 for m in missing if any(m))
    results = []
    for column, column_missing in zip(columns, missing, strict=True):
        live = column.current is not None
        ref = _finite(column.reference)
        cur = _finite(column.current) if column.current is not None else ref[:0]
        test = choose_test(ref, cur, categorical=column.categorical)
        threshold = _threshold(test, n_tests, alpha)
        score = _score(test, ref, cur) if live and len(ref) and len(cur) else math.nan
        options = {"live": live, "categorical": column.categorical}
        results.append(_result(column.name, test, score, threshold, ref, cur, **options))
        if any(column_missing):
            rows = (len(column.reference), 0 if column.current is None else len(column.current))
            limit = _threshold("missing", n_tests, alpha)
            results.append(_missing_result(column.name, limit, column_missing, rows, score=live))
    return results


def compare(
    features: Sequence[str],
    reference: npt.NDArray[Any],
    current: npt.NDArray[Any],
    *,
    alpha: float = ALPHA,
) -> list[FeatureResult]:
    """Test every column of `current` against the same column of `reference`, and the
    missing share of every column where either has missing values (see the module
    docstring); each missing-share result follows its feature's."""
    columns = [Column(name, reference[:, i], current[:, i]) for i, name in enumerate(features)]
    return compare_columns(columns, alpha=alpha)


def untested(
    features: Sequence[str],
    reference: npt.NDArray[Any],
    current: npt.NDArray[Any],
    *,
    alpha: float = ALPHA,
) -> list[FeatureResult]:
    """What `compare` would test, without a verdict (the window is below its minimum):
    statistic NaN, drift False, reference histograms only. Nothing here depends on the
    live rows: with a handful of them, live shares (or a test chosen by their distinct
    values) would pin individual request values. Missing-share results appear only
    for features whose reference has missing values, for the same reason."""
    del current  # see above: nothing may depend on it
    columns = [Column(name, reference[:, i], None) for i, name in enumerate(features)]
    return compare_columns(columns, alpha=alpha)
