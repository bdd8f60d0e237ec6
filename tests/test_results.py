"""results.py: --compare's statistics, and folding the ranks' files into results.jsonl."""

import json
import os

import pytest

import results as res


def test_bootstrap_and_sign_test_known_cases():
    assert res.bootstrap_ci([0.25] * 7, resamples=500) == (pytest.approx(0.25), pytest.approx(0.25))
    lo, hi = res.bootstrap_ci([0.0, 1.0] * 50, resamples=2000, seed=1)
    assert lo < 0.5 < hi and hi - lo < 0.3
    assert res.bootstrap_ci([1, 2, 3], seed=3) == res.bootstrap_ci([1, 2, 3], seed=3)  # seeded
    assert res.sign_test([1, 1, 1, 1, 1]) == pytest.approx(2 / 32)  # all five one way: 2 * 0.5^5
    assert res.sign_test([1, -1, 0, 0]) == 1.0  # zeros dropped
    assert res.sign_test([1] * 9 + [-1]) == pytest.approx(2 * 11 / 1024)
    assert res.sign_test([]) == 1.0


def test_fold_keeps_the_newest_row_per_id_and_deletes_rank_files(tmp_path):
    """results.jsonl's ids keep their place, new ids follow in data order; a rank's row replaces an
    older one; every rank file is deleted, whatever world size wrote it."""

    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("results.jsonl", [dict(id="b", error=None), dict(id="a", error="wav not found")])
    write("results.rank0.jsonl", [dict(id="a", error=None)])
    write("results.rank3.jsonl", [dict(id="d", error=None), dict(id="c", error=None)])
    rows = res.fold(str(tmp_path), ["c", "a", "d"])
    assert [(r["id"], r["error"]) for r in rows] == [
        ("b", None),
        ("a", None),
        ("c", None),
        ("d", None),
    ]
    assert res.read_results(str(tmp_path / "results.jsonl")) == rows
    assert sorted(os.listdir(tmp_path)) == ["results.jsonl"]
