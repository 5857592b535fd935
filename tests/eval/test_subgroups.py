"""Subgroup gaps on constructed data where the truth is known."""

import numpy as np
import pytest

from medgem.errors import InputError
from medgem.eval.metrics import mean_of
from medgem.eval.subgroups import subgroup_report


def _data(rate_by_group: dict[str, float], n: int = 200):
    """Exactly round(rate * n) correct items per group, in shuffled order."""
    rng = np.random.default_rng(0)
    correct, meta = [], []
    for group, rate in rate_by_group.items():
        k = round(rate * n)
        values = np.array([1.0] * k + [0.0] * (n - k))
        rng.shuffle(values)
        correct += values.tolist()
        meta += [{"sex": group, "site": "north" if i % 2 else "south"} for i in range(n)]
    return np.array(correct), meta


def test_real_gap_is_flagged_with_the_right_groups():
    correct, meta = _data({"female": 0.9, "male": 0.5})
    [entry] = subgroup_report({"accuracy": mean_of(correct)}, meta, ["sex"], n_boot=1000, seed=1)
    assert entry["groups"]["female"]["accuracy"]["value"] == pytest.approx(0.9)
    assert entry["groups"]["male"]["accuracy"]["value"] == pytest.approx(0.5)
    assert entry["groups"]["female"]["n"] == 200
    gap = entry["gaps"]["accuracy"]
    assert (gap["high_group"], gap["low_group"], gap["flag"]) == ("female", "male", True)
    assert gap["gap"] == pytest.approx(0.4)
    assert 0.3 < gap["low"] < 0.4 < gap["high"] < 0.5  # roughly 0.4 +/- 1.96 * 0.04


def test_no_gap_is_not_flagged():
    correct, meta = _data({"female": 0.7, "male": 0.7})
    [entry] = subgroup_report({"accuracy": mean_of(correct)}, meta, ["sex"], n_boot=1000, seed=1)
    gap = entry["gaps"]["accuracy"]
    assert gap["gap"] == pytest.approx(0.0) and not gap["flag"] and gap["low"] < 0 < gap["high"]


def test_small_gap_on_small_groups_is_not_flagged():
    correct, meta = _data({"a": 0.6, "b": 0.5}, n=30)
    [entry] = subgroup_report({"accuracy": mean_of(correct)}, meta, ["sex"], n_boot=1000, seed=1)
    assert entry["gaps"]["accuracy"]["gap"] == pytest.approx(0.1) and not entry["gaps"]["accuracy"]["flag"]


def test_groups_below_min_size_are_reported_not_compared():
    correct = np.array([1.0] * 50 + [0.0] * 50 + [0.0] * 3)
    meta = [{"band": "young"}] * 50 + [{"band": "old"}] * 50 + [{"band": "tiny"}] * 3
    [entry] = subgroup_report({"acc": mean_of(correct)}, meta, ["band"], n_boot=200, min_size=5)
    assert entry["groups"]["tiny"]["n"] == 3
    assert entry["gaps"]["acc"]["low_group"] == "old"


def test_missing_values_form_their_own_group_and_unknown_column_is_an_error():
    correct = np.array([1.0, 0.0, 1.0])
    meta = [{"sex": "F"}, {}, {"sex": "M"}]
    [entry] = subgroup_report({"acc": mean_of(correct)}, meta, ["sex"], n_boot=50)
    assert set(entry["groups"]) == {"F", "M", "(missing)"}
    with pytest.raises(InputError, match="subgroup column 'ethnicity' is in no item; available: sex"):
        subgroup_report({"acc": mean_of(correct)}, meta, ["ethnicity"])


def test_results_do_not_depend_on_column_order():
    correct, meta = _data({"female": 0.8, "male": 0.6})
    one = subgroup_report({"accuracy": mean_of(correct)}, meta, ["sex", "site"], n_boot=300, seed=3)
    two = subgroup_report({"accuracy": mean_of(correct)}, meta, ["site", "sex"], n_boot=300, seed=3)
    assert one[0] == two[1] and one[1] == two[0]


def test_numeric_columns_are_binned_and_say_how():
    ages = [str(a) for a in range(18, 98)]  # 80 items, one per age
    meta = [{"age": a, "sex": "f" if i % 2 else "m"} for i, a in enumerate(ages)]
    correct = np.ones(len(meta))
    [bands, quartiles, auto, sex] = subgroup_report({"acc": mean_of(correct)}, meta,
                                                    ["age:10", "age:q4", "age", "sex"], n_boot=20)
    assert list(bands["groups"]) == [f"[{lo}, {lo + 10})" for lo in range(10, 100, 10)]
    assert bands["groups"]["[10, 20)"]["n"] == 2 and bands["groups"]["[90, 100)"]["n"] == 8
    assert bands["binning"] == "bands of width 10" and bands["column"] == "age"
    assert [g["n"] for g in quartiles["groups"].values()] == [20, 20, 20, 20]
    assert auto["binning"].startswith("automatic quantiles") and len(auto["groups"]) == 4
    assert sex["binning"] is None and list(sex["groups"]) == ["f", "m"]


def test_bad_binning_specs_are_refused():
    meta = [{"age": "40", "sex": "f"}, {"age": "unknown", "sex": "m"}]
    for spec, message in (("sex:10", "not numbers"), ("age:abc", "band width"), ("age:0", "positive"),
                          ("age:q1", "q2..q10")):
        with pytest.raises(InputError, match=message):
            subgroup_report({"acc": mean_of(np.ones(2))}, meta, [spec], n_boot=10)
