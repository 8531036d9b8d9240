"""Tests of analyze.py: its numbers against ones computed here by hand, every report section present,
bad lines reported and skipped, and one real tiny run analysed with the frozen model."""
import json
import os

import numpy as np
import pytest

import analyze as A


def _row(step, problem, legal=True, solve=0.5, n_parsed=8, concepts=("addition",), length=0.02):
    return {"step": step, "round": 0, "reference": "What is 1+1?", "problem": problem if legal else None,
            "legal": legal, "concepts": list(concepts) if legal else [], "solve_rate": solve if legal else 0.0,
            "n_parsed": n_parsed if legal else 0, "majority": "3" if legal and n_parsed else None, "answers": [],
            "rewards": {"total": 1.0, "solvability": 0.5, "diversity": 0.3, "length": length, "format": 1.0},
            "trained_as_teacher": False, "trained_as_student": False, "teacher_output": "x" * 10}


@pytest.fixture
def run_dir(tmp_path):
    """4 steps, hand-chosen values; line 4 is malformed and the last line is truncated."""
    rows = [
        _row(1, "What is 2 + 1?", solve=0.5, concepts=["addition"]),
        _row(1, "What is 3 * 4?", solve=1.0, concepts=["multiplication", "times tables"]),
        _row(1, "bad", legal=False),
        _row(2, "What is 9 - 4?", solve=0.75, concepts=["subtraction"]),
        _row(2, "What is 8 / 2?", solve=0.0, n_parsed=0, concepts=["division"]),
        _row(3, "Ana has 3 pens and gets 2 more.", solve=0.25, concepts=["word problems", "Addition"]),
        _row(4, "What is 7 squared?", solve=0.875, concepts=["exponents"]),
        _row(4, "What is 5 + 5?", solve=0.625, concepts=["addition"]),
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, '{"step": 1, "problem": oops')  # line 4: malformed
    text = "\n".join(lines) + "\n" + json.dumps(_row(4, "never read"))[:40]  # truncated last line (line 10)
    (tmp_path / "problems.jsonl").write_text(text)
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "len/student": 10.0 * s})
                                                      for s in range(1, 5)) + "\n")
    (tmp_path / "config.json").write_text(json.dumps({"band_lo": 0.5, "band_hi": 0.9, "len_cap": 1000,
                                                      "model": "tiny", "seed": 0}))
    return tmp_path


def test_rouge_l_and_helpers_by_hand():
    assert A.lcs_len("the cat sat on the mat".split(), "the cat on a mat".split()) == 4
    p, r = 4 / 5, 4 / 6
    assert A.rouge_l("The cat sat on the mat", "the cat on a mat") == pytest.approx(2 * p * r / (p + r))
    assert A.rouge_l("a b c", "a b c") == 1.0 and A.rouge_l("a", "b") == 0.0 and A.rouge_l("", "a") == 0.0
    assert A.rouge_l("x y", "y x") == pytest.approx(0.5)  # order matters: LCS 1 of 2
    assert A.mean_rouge_l(["a b", "a c"], ["a b"], same=False) == pytest.approx((1.0 + 0.5) / 2)
    assert A.mean_rouge_l(["a b", "a c", "a b"], ["a b", "a c", "a b"], same=True) == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert A.jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3) and A.jaccard(set(), set()) is None
    assert A.stage_bounds([1, 2, 3, 4, 5], 2) == [[1, 3], [4, 5]] and A.stage_bounds([7], 4) == [[7, 7]]
    # PCA: points on a line in 3-D land on PC1 with all the variance
    x = np.outer(np.arange(5.0), [1.0, 2.0, -1.0])
    coords, share = A.pca_2d(x)
    assert share[0] == pytest.approx(1.0) and np.allclose(coords[:, 1], 0, atol=1e-9)
    assert abs(coords[1, 0] - coords[0, 0]) == pytest.approx(np.sqrt(6))
    e = A.hashed_bow(["a b a", "c"])
    assert e.shape == (2, 256) and e[0].sum() == 5 and e[1].sum() == 1  # 3 unigrams + 2 bigrams


def test_report_numbers_sections_and_bad_lines(run_dir, tmp_path, capsys):
    out = tmp_path / "report"
    rep = A.main([str(run_dir), "--out", str(out), "--stages", "2", "--quiet"])
    r = rep["runs"][0]
    err = capsys.readouterr().err
    assert "line 4" in err and "line 10" in err
    assert [(b["line"], b["file"]) for b in r["skipped_lines"]] == [(4, "problems.jsonl"), (10, "problems.jsonl")]
    ps = r["per_step"]
    assert ps["step"] == [1, 2, 3, 4]
    assert ps["legal_rate"] == pytest.approx([2 / 3, 1, 1, 1])
    assert ps["solve_rate_mean"] == pytest.approx([0.75, 0.75, 0.25, 0.75])  # step 2: the unparsed one is out
    assert ps["solve_rate_std"] == pytest.approx([0.25, 0.0, 0.0, 0.125])
    assert ps["in_band_share"] == pytest.approx([0.5, 1.0, 0.0, 1.0])  # 1.0 and 0.25 outside [0.5, 0.9]
    # concepts are compared lower-cased: "Addition" at step 3 is "addition" from step 1
    assert ps["unique_concepts_cum"] == [3, 5, 6, 7] and ps["new_concepts"] == [3, 2, 1, 1]
    first = {c["concept"]: (c["step"], c["count"]) for c in r["concepts_first_seen"]}
    assert first["addition"] == (1, 3) and first["exponents"] == (4, 1) and first["word problems"] == (3, 1)
    assert ps["solution_tokens_mean"] == [10.0, 20.0, 30.0, 40.0]
    assert ps["question_words_mean"] == pytest.approx([5, 5, 8, 4.5])  # whitespace-split words
    s0, s1 = r["stages"]
    assert (s0["steps"], s1["steps"]) == ([1, 2], [3, 4])
    assert s0["solve_rate"]["mean"] == pytest.approx(0.75) and s0["solve_rate"]["std"] == pytest.approx(np.std([.5, 1, .75]))
    assert s1["in_band_share"] == pytest.approx(2 / 3) and s0["legal_rate"] == pytest.approx(4 / 5)
    assert s0["solution_tokens_capped"]["mean"] == pytest.approx(20.0)  # length reward 0.02 * cap 1000
    c0 = {"addition", "multiplication", "times tables", "subtraction", "division"}
    c1 = {"word problems", "addition", "exponents"}
    assert r["concept_overlap"][0][1] == pytest.approx(len(c0 & c1) / len(c0 | c1))
    t0 = ["What is 2 + 1?", "What is 3 * 4?", "What is 9 - 4?", "What is 8 / 2?"]
    t1 = ["Ana has 3 pens and gets 2 more.", "What is 7 squared?", "What is 5 + 5?"]
    want = np.mean([A.rouge_l(a, b) for a in t0 for b in t1])
    assert r["rouge_l"][0][1] == pytest.approx(want) and r["rouge_l"][1][0] == pytest.approx(want)
    assert len(r["map"]["points"]) == 7 and "bag-of-words" in r["map"]["method"]
    assert r["summary"]["unique_concepts"] == 7 and r["summary"]["problems"] == 8
    assert all(e["solve_rate"] is not None for s in r["stages"] for e in s["examples"])
    page = (out / "report.html").read_text()
    for sid in A.SECTIONS:
        assert f'id="{sid}"' in page, sid
    assert "What is 7 squared?" in page and json.load(open(out / "report.json"))["runs"][0]["label"] == r["label"]
    if A._plt() is not None:
        assert "data:image/png;base64," in page and os.path.exists(out / "fig_solve_rate.png")


def test_two_runs_side_by_side_and_clear_errors(run_dir, tmp_path):
    rep = A.main([str(run_dir), str(run_dir), "--out", str(tmp_path / "r2"), "--quiet"])
    assert len(rep["runs"]) == 2 and rep["runs"][0]["summary"] == rep["runs"][1]["summary"]
    with pytest.raises(SystemExit, match="no problems.jsonl"):
        A.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "r3")])
    with pytest.raises(SystemExit, match="unknown model"):
        A.main([str(run_dir), "--out", str(tmp_path / "r3"), "--frozen-model", "no such model"])


@pytest.mark.parametrize("recipe", ["code", "paper"])
def test_real_tiny_run_with_frozen_model(tmp_path, recipe):
    """A 2-step tiny run of each recipe through opensir.train, then the report with the frozen tiny model."""
    import opensir as O
    O.train(O.config_from_args(["--model", "tiny", "--recipe", recipe, "--steps", "2", "--n_refs", "2",
                                "--out", str(tmp_path / "run")]))
    rep = A.main([str(tmp_path / "run"), "--out", str(tmp_path / "rep"), "--stages", "2", "--quiet",
                  "--frozen-model", "tiny", "--frozen-problems", "4", "--frozen-samples", "4"])
    r = rep["runs"][0]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "problems.jsonl")]
    legal = [x for x in rows if x["legal"]]
    assert r["summary"]["problems"] == len(rows) and r["summary"]["legal_rate"] == pytest.approx(len(legal) / len(rows))
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert r["per_step"]["legal_rate"] == pytest.approx([m["teacher/legal_rate"] for m in metrics])
    solved = [[x["solve_rate"] for x in legal if x["step"] == s and x["n_parsed"]] for s in (1, 2)]
    assert r["per_step"]["solve_rate_mean"] == pytest.approx([np.mean(v) for v in solved])
    assert r["per_step"]["solve_rate_mean"] == pytest.approx([m["solve_rate/mean"] for m in metrics])
    for s in r["stages"]:
        fz = s["frozen_solve_rate"]
        assert 1 <= fz["n"] <= 4 and 0.0 <= fz["mean"] <= 1.0
    assert "hidden states" in r["map"]["method"] and not r["skipped_lines"]
