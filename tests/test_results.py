"""results.py: --compare's statistics, and folding the ranks' files into results.jsonl."""

import json
import os

import pytest

import results as res


def test_bootstrap_and_sign_test_known_cases():
    assert res.bootstrap_ci([0.25] * 7, resamples=500) == (pytest.approx(0.25), pytest.approx(0.25))
    lo, hi = res.bootstrap_ci([0.0, 1.0] * 50, resamples=2000, seed=1)
    assert lo < 0.5 < hi
    assert hi - lo < 0.3
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


def test_summary_counts_the_outliers_and_gives_the_mean_without():
    """A rate above 0.5 is an outlier (0.5 itself is not): counted, and left out of the second
    mean; bad rows are in neither."""
    rows = [
        dict(id="a", metric="wer", wer=0.1, error=None),
        dict(id="b", metric="wer", wer=0.5, error=None),
        dict(id="c", metric="wer", wer=3.0, error=None),  # a looping clip: insertions
        dict(id="d", metric="cer", cer=0.7, error=None),
        dict(id="e", error="wav not found"),
    ]
    summary = res.summarize(rows, len(rows))
    assert summary["wer_mean"] == pytest.approx(3.6 / 3) and summary["n_wer"] == 3
    assert summary["wer_outliers"] == 1
    assert summary["wer_mean_without_outliers"] == pytest.approx(0.3)
    assert summary["cer_outliers"] == 1 and summary["cer_mean_without_outliers"] is None
    table = res.table(summary)
    assert "| rows with WER > 0.5 (outliers) | 1 |" in table
    assert "| WER without the outliers (mean) | 0.3 |" in table
    assert "DNSMOS" not in table  # not measured: no rows for it


def test_compare_pairs_dnsmos_and_the_summary_means_it(tmp_path, capsys):
    """DNSMOS's four values are compared like WER (B - A, paired by id) and averaged in the
    summary, with their rows in the table."""
    keys = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808")
    a = [dict(id=str(i), wer=0.1, error=None, **dict.fromkeys(keys, 3.0)) for i in range(4)]
    b = [dict(id=str(i), wer=0.1, error=None, **dict.fromkeys(keys, 2.5)) for i in range(4)]
    summary = res.summarize(a, 4)
    assert [summary[f"{k}_mean"] for k in keys] == [3.0] * 4
    assert "| DNSMOS OVRL (mean) | 3 |" in res.table(summary)
    for name, rows in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {r["metric"]: r for r in res.compare(str(tmp_path / "a"), str(tmp_path / "b"))}
    assert [out[k]["diff"] for k in keys] == [pytest.approx(-0.5)] * 4
    assert out["dnsmos_ovrl"]["n"] == 4 and out["dnsmos_ovrl"]["sign_p"] == pytest.approx(2 / 16)
    assert "| dnsmos_p808 | 4 | 3.0000 | 2.5000 | -0.5000 |" in capsys.readouterr().out
