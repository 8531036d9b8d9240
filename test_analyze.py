"""Tests of analyze.py: its numbers against ones computed here by hand, every report section present,
bad lines reported and skipped, and one real tiny run analysed with the frozen model."""
import json
from collections import Counter
import os

import numpy as np
import pytest

import analyze as A
from conftest import tiny_path


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
                  "--frozen-model", "tiny", "--frozen-problems", "4", "--frozen-samples", "4",
                  "--difficulty", "toy", "--truth", "toy"])  # the tiny model writes some toy-template problems
    r = rep["runs"][0]
    import tiny as T
    from checker import normalize_answer
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
    for i, st in enumerate((1, 2)):  # labels and their accuracy, by hand from the rows
        here = [x for x in legal if x["step"] == st]
        assert sum(r["per_step"]["difficulty_share"][i]) == pytest.approx(1.0)
        assert r["per_step"]["difficulty_share"][i][-1] == pytest.approx(
            np.mean([T.toy_rung(x["problem"]) is None for x in here]))
        known = [x for x in here if x["n_parsed"] and T.toy_answer(x["problem"]) is not None]
        ok = [normalize_answer(x["majority"]) == normalize_answer(str(T.toy_answer(x["problem"]))) for x in known]
        assert r["per_step"]["label_accuracy_n"][i] == len(known)
        assert r["per_step"]["label_accuracy"][i] == (pytest.approx(np.mean(ok)) if ok else None)
    assert all("frozen_label_accuracy" in s for s in r["stages"]) and r["solutions"]["file"] == "solutions.jsonl.gz"
    assert "saved no student solutions" not in (tmp_path / "rep" / "report.html").read_text()  # a real run saves them


# --- a toy-world-like run written here, with known rungs, truths and concepts ----------------------------

MALFORMED = ["adding three numbersnumbers", "multi-step arithmetiithmetic", "mult"]


def _toy_like_run(path, steps=12, per_step=24, seed=0, solutions=True):
    """problems.jsonl rows of toy-template problems whose rung drifts up over the steps and whose majority is
    the true answer two times in three; concept lists mix the toy vocabulary with a few malformed strings.
    Returns the rows, for counting by hand."""
    import gzip
    import random

    import tiny as T
    rng = random.Random(seed)
    os.makedirs(path, exist_ok=True)
    rows = []
    for step in range(1, steps + 1):
        for k in range(per_step):
            legal = k % 8 != 7
            rung = min(4, int(rng.random() * 2 + 3 * step / steps))
            text, _, ans = T.toy_problem(rng, rung)
            if k % 6 == 5:
                text = "Tell me a story about " + str(k)  # off the templates: no rung, no truth
            right = rng.random() < 2 / 3
            concepts = list(T.TOY_RUNGS[rung]) + ([MALFORMED[k % 3]] if k % 5 == 0 else [])
            row = _row(step, text, legal=legal, solve=rng.choice([0.25, 0.5, 0.75, 1.0]), concepts=concepts)
            row["majority"] = (str(ans) if right else str(ans + 1)) if legal else None
            rows.append(row)
    (path / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "solve_rate/mean": 0.5 + s / 100,
                                                            "student/agree": 0.6, "len/student": 12.0 + s,
                                                            "recipe": "code", "solve_rate/hist10": [1] * 10}) + "\n"
                                                for s in range(1, steps + 1)))
    (path / "config.json").write_text(json.dumps({"model": "toy", "band_lo": 0.5, "band_hi": 0.9, "seed": seed}))
    if solutions:
        sol = [{"step": s, "round": 0, "problem": f"What is {s} + 2?", "majority": str(s + 2),
                "answers": [str(s + 2)] * 3 + [None], "solutions": [f"{s} + 2 = {s + 2}.\n\\boxed{{{s + 2}}}"] * 4}
               for s in range(1, steps + 1)]
        with gzip.open(path / "solutions.jsonl.gz", "wt") as f:
            f.write("".join(json.dumps(x) + "\n" for x in sol))
    return rows


def test_difficulty_mix_and_label_accuracy_of_a_toy_run_by_hand(tmp_path):
    import tiny as T
    rows = _toy_like_run(tmp_path / "toy")
    rep = A.main([str(tmp_path / "toy"), "--out", str(tmp_path / "rep"), "--stages", "3", "--quiet"])
    r = rep["runs"][0]
    assert r["difficulty"]["labels"] == ["0", "1", "2", "3", "4", "no label"] and r["difficulty"]["numeric"]
    ps = r["per_step"]
    for i, step in enumerate(ps["step"]):
        legal = [x for x in rows if x["step"] == step and x["legal"]]
        rungs = [T.toy_rung(x["problem"]) for x in legal]
        want = [sum(g == j for g in rungs) / len(legal) for j in range(5)] + [rungs.count(None) / len(legal)]
        assert ps["difficulty_share"][i] == pytest.approx(want)
        on = [g for g in rungs if g is not None]
        assert ps["difficulty_mean"][i] == pytest.approx(np.mean(on))
        assert ps["difficulty_se"][i] == pytest.approx(np.std(on, ddof=1) / np.sqrt(len(on)))
        known = [x for x in legal if T.toy_answer(x["problem"]) is not None]
        ok = [x["majority"] == str(T.toy_answer(x["problem"])) for x in known]
        assert ps["label_accuracy_n"][i] == len(known) and ps["label_accuracy"][i] == pytest.approx(np.mean(ok))
    # the rung climbs in this run, and the stage means (on integer stages, with SE) show it
    st = [s["difficulty"] for s in r["stages"]]
    assert st[0]["mean"] < st[1]["mean"] < st[2]["mean"] and all(s["se"] > 0 for s in st)
    assert r["truth"]["by"] == "the toy world's true answer" and 0.5 < r["truth"]["label_accuracy"]["mean"] < 0.8
    by = r["truth"]["by_difficulty"]  # label accuracy per rung, by hand
    assert set(by) == {"0", "1", "2", "3", "4"}
    for j in range(5):
        known = [x for x in rows if x["legal"] and T.toy_rung(x["problem"]) == j]
        assert by[str(j)]["n"] == len(known)
        assert by[str(j)]["mean"] == pytest.approx(np.mean([x["majority"] == str(T.toy_answer(x["problem"]))
                                                            for x in known]))
    # the toy vocabulary is known: the three malformed strings are set apart, with a reason each
    kinds = {c["concept"]: c["kind"] for c in r["concepts_first_seen"]}
    assert {c for c, k in kinds.items() if k == "malformed"} == set(MALFORMED)
    assert r["summary"]["concepts_by_kind"] == {"vocabulary": 8, "malformed": 3}
    assert r["per_step"]["unique_concepts_cum_by_kind"]["malformed"][-1] == 3
    # saved solutions: all 12 problems counted, 3 shown
    assert r["solutions"]["problems"] == 12 and len(r["solutions"]["shown"]) == 3
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "\\boxed{" in page and "adding three numbersnumbers" in page
    if A._plt() is not None:
        for name in ("curves", "difficulty", "label_accuracy", "map_0", "overlap_0", "legal_concepts"):
            assert os.path.getsize(tmp_path / "rep" / f"fig_{name}.png") > 1000, name
    # without labels: none asked for
    rep = A.main([str(tmp_path / "toy"), "--out", str(tmp_path / "rep2"), "--quiet", "--difficulty", "none",
                  "--truth", "none", "--solutions", "0"])
    r = rep["runs"][0]
    assert r["difficulty"]["labels"] == [] and r["truth"]["label_accuracy"]["n"] == 0
    assert r["solutions"]["shown"] == []


def test_difficulty_from_a_field_and_from_a_function(tmp_path, monkeypatch):
    rows = [dict(_row(s, f"What is {s} + {k}?"), level=lvl) for s in (1, 2) for k, lvl in
            enumerate(["easy", "hard", "hard", None])]
    rows[0]["level"] = ["not", "a", "label"]  # a list is no label, not a crash
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = A.main([str(tmp_path / "run"), "--out", str(tmp_path / "a"), "--quiet", "--difficulty", "field:level"])
    r = rep["runs"][0]
    assert r["difficulty"]["labels"] == ["easy", "hard", "no label"] and not r["difficulty"]["numeric"]
    assert r["per_step"]["difficulty_share"] == [[0, 0.5, 0.5], [0.25, 0.5, 0.25]]
    (tmp_path / "mylabels.py").write_text(
        "def size(text):\n    n = int(text.split()[-1].rstrip('?'))\n    if n == 2:\n        raise ValueError(n)\n"
        "    return n * 10\n\ndef answer(text):\n    a, b = text[8:-1].split(' + ')\n    return int(a) + int(b)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rep = A.main([str(tmp_path / "run"), "--out", str(tmp_path / "b"), "--quiet", "--difficulty", "mylabels:size",
                  "--truth", "mylabels:answer"])
    r = rep["runs"][0]
    assert r["difficulty"]["labels"] == ["0", "10", "30", "no label"]  # the raising call: no label, counted
    assert r["label_errors"] == {"--difficulty: ValueError": 2}
    assert r["per_step"]["difficulty_mean"] == pytest.approx([40 / 3, 40 / 3])
    assert r["per_step"]["label_accuracy"] == [0.25, 0.25]  # majority "3": right for 1 + 2 and 2 + 1
    for bad in (["--difficulty", "nosuchmodule:f"], ["--truth", "field:x"], ["--difficulty", "rung"]):
        with pytest.raises(SystemExit, match="--difficulty|--truth"):
            A.main([str(tmp_path / "run"), "--out", str(tmp_path / "c")] + bad)


def test_malformed_concepts_are_set_apart_by_a_stated_reason():
    counts = Counter({"linear equations": 9, "multiplication": 7, "algebra": 3, "linear algebra": 2,
                      "multiplcation": 1, "mult": 1, "numbersnumbers": 1, "<b>": 1, "x" * 90: 1, "42": 1})
    k = A.classify_concepts(counts)
    assert {c for c, v in k.items() if v["kind"] == "malformed"} == {"multiplcation", "mult", "numbersnumbers",
                                                                      "<b>", "x" * 90, "42"}
    assert k["linear algebra"]["kind"] == k["algebra"]["kind"] == "other"  # a real topic is not a typo
    assert "near-copy of 'multiplication'" in k["multiplcation"]["why"] and "truncated" in k["mult"]["why"]
    kv = A.classify_concepts(counts + Counter({"equations": 1}), vocab={"multiplication", "algebra", "linear equations"})
    assert kv["algebra"]["kind"] == "vocabulary" and kv["linear algebra"]["kind"] == "other"
    assert kv["equations"]["why"] == "a fragment of 'linear equations'"  # with a closed vocabulary only
    assert A.classify_concepts(Counter({"linear equations": 3, "equations": 1}))["equations"]["kind"] == "other"


def test_many_difficulty_labels_are_grouped():
    nums = Counter({float(x): 1 for x in range(20)})
    order, key = A.label_groups(nums + Counter({None: 2}))
    assert len(order) == 9 and order[-1] == "no label" and order[0] == "0–2.38"
    assert key(0.0) == order[0] and key(19.0) == order[7] and key(None) == "no label"
    words = Counter({f"topic {i:02d}": 20 - i for i in range(15)})
    order, key = A.label_groups(words)
    assert len(order) == 12 and order[-1] == "other labels" and key("topic 14") == "other labels"
    assert key("topic 00") == "topic 00"
    order, key = A.label_groups(Counter({2.0: 3, 1.0: 1, "hard": 1}))
    assert order == ["1", "2", "hard"]


def test_trend_smoothing_and_stat_by_hand():
    t = A.trend([0, 0, 1, 1, 2, 2], [1.0, 0.8, 0.7, 0.5, 0.4, 0.2])
    assert t["slope"] == pytest.approx(-0.3) and t["n"] == 6
    resid = np.array([1.0, 0.8, 0.7, 0.5, 0.4, 0.2]) - (0.9 - 0.3 * np.array([0, 0, 1, 1, 2, 2]))
    assert t["se"] == pytest.approx(np.sqrt((resid ** 2).sum() / 4 / 4))
    assert A.trend([1, 1, 1], [1, 2, 3]) is None and A.trend([0, 1], [0, 1]) is None
    assert A.smooth([1.0, None, 3.0, 5.0], 2) == [1.0, None, 2.0, 4.0] and A.smooth([1, 2], 1) == [1, 2]
    s = A._stat([1.0, 2.0, 3.0])
    assert s["std"] == pytest.approx(np.std([1, 2, 3])) and s["se"] == pytest.approx(1 / np.sqrt(3))


def test_wrong_typed_fields_are_skipped_and_counted(tmp_path):
    _toy_like_run(tmp_path / "run", steps=3, per_step=8)
    good = [json.loads(x) for x in open(tmp_path / "run" / "problems.jsonl")]
    hostile = [{"step": 2, "problem": 5}, {"step": 2, "concepts": "addition"}, {"step": 2, "concepts": [1, 2]},
               {"step": 2, "solve_rate": "0.5"}, {"step": 2, "solve_rate": 7}, {"step": 2, "n_parsed": "3"},
               {"step": 2, "legal": "yes"}, {"step": 2, "rewards": []}, {"step": 2, "rewards": {"length": "x"}},
               {"step": 2, "teacher_output": 5}, {"step": 2, "majority": ["3"]}, {"step": True}, {"step": 2.5},
               {"step": "1"}, [1, 2], "text", 3, None]
    lines = [json.dumps(r) for r in good] + [json.dumps(dict(_row(2, "What is 1 + 1?"), **h)) if isinstance(h, dict)
                                             and "step" in h and h["step"] == 2 else json.dumps(h) for h in hostile]
    (tmp_path / "run" / "problems.jsonl").write_text("\n".join(lines) + "\n")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "solve_rate/mean": "high", "len/student": None}) + "\n")
    sols = [{"step": 1, "problem": "p", "solutions": "not a list"}, {"step": 1, "problem": "p", "solutions": [1]},
            {"step": 1, "problem": "p", "solutions": ["ok"], "answers": [{"a": 1}]}, {"step": 1, "solutions": ["x"]},
            {"step": 1, "problem": "What is 1 + 1?", "majority": "2", "answers": ["2", None], "solutions": ["fine"]}]
    import gzip
    with gzip.open(tmp_path / "run" / "solutions.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(s) + "\n" for s in sols) + '{"step": 1, "probl')
    rep = A.main([str(tmp_path / "run"), "--out", str(tmp_path / "rep"), "--quiet"])
    r = rep["runs"][0]
    skipped = Counter(b["file"] for b in r["skipped_lines"])
    assert skipped == {"problems.jsonl": len(hostile), "metrics.jsonl": 1, "solutions.jsonl.gz": 5}
    assert r["summary"]["problems"] == len(good)
    assert r["solutions"]["problems"] == 1 and r["solutions"]["shown"][0]["solutions"] == ["fine"]
    assert any("field 'solve_rate' is str" in b["error"] for b in r["skipped_lines"])
    page = (tmp_path / "rep" / "report.html").read_text()
    assert f"{r['label']}: {len(hostile) + 6}" in page  # the count per run, then the lines
    # a gzip file cut in the middle of its stream: the rows before the cut are read, the rest counted
    raw = open(tmp_path / "run" / "solutions.jsonl.gz", "rb").read()
    (tmp_path / "run" / "solutions.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    A.main([str(tmp_path / "run"), "--out", str(tmp_path / "rep"), "--quiet"])


def test_a_run_with_no_usable_line_still_gets_a_report(tmp_path):
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "problems.jsonl").write_text('{"step": "x"}\n[]\n')
    _toy_like_run(tmp_path / "toy", steps=2, per_step=8)
    rep = A.main([str(tmp_path / "empty"), str(tmp_path / "toy"), "--out", str(tmp_path / "rep"), "--quiet"])
    assert rep["runs"][0]["summary"]["problems"] == 0 and len(rep["runs"][0]["skipped_lines"]) == 2
    assert rep["runs"][1]["summary"]["problems"] == 16


def test_no_file_is_written_through_a_link_planted_in_out(tmp_path):
    _toy_like_run(tmp_path / "run", steps=2, per_step=8, solutions=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "rep"
    out.mkdir()
    os.symlink(victim, out / "report.html")
    with pytest.raises(SystemExit, match="symbolic link"):
        A.main([str(tmp_path / "run"), "--out", str(out), "--quiet"])
    assert victim.read_text() == "precious"
    os.remove(out / "report.html")
    os.symlink(tmp_path / "new_file_outside", out / "report.json")  # a dangling link: nothing created
    with pytest.raises(SystemExit, match="symbolic link"):
        A.main([str(tmp_path / "run"), "--out", str(out), "--quiet"])
    assert not os.path.lexists(tmp_path / "new_file_outside")
    os.remove(out / "report.json")
    if A._plt() is not None:  # a figure's name, found only when it is written
        os.symlink(victim, out / "fig_lengths.png")
        with pytest.raises(SystemExit, match="symbolic link"):
            A.main([str(tmp_path / "run"), "--out", str(out), "--quiet"])
        assert victim.read_text() == "precious"
        os.remove(out / "fig_lengths.png")
    os.mkfifo(out / "report.json")  # a FIFO would hang an ordinary open
    with pytest.raises(SystemExit, match="not a plain file"):
        A.main([str(tmp_path / "run"), "--out", str(out), "--quiet"])
    os.remove(out / "report.json")
    A.main([str(tmp_path / "run"), "--out", str(out), "--quiet"])
    assert (out / "report.html").is_file() and not (out / "report.html").is_symlink()
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(SystemExit, match="not a directory"):
        A.main([str(tmp_path / "run"), "--out", str(tmp_path / "dangling"), "--quiet"])
    assert not os.path.lexists(tmp_path / "nowhere")


def test_several_runs_overlaid_and_compare_flag(tmp_path):
    _toy_like_run(tmp_path / "a" / "seed1", seed=1, steps=6, per_step=8)
    _toy_like_run(tmp_path / "b" / "seed1", seed=2, steps=8, per_step=8, solutions=False)
    rep = A.main([str(tmp_path / "a" / "seed1"), "--compare", str(tmp_path / "b" / "seed1"), "--out",
                  str(tmp_path / "rep"), "--quiet", "--smooth", "3", "--curves", "solve_rate/mean", "len/student"])
    a, b = rep["runs"]
    assert a["label"] != b["label"] and a["label"].startswith("a") and b["label"].startswith("b")
    assert a["metrics"]["values"]["len/student"] == [13.0 + s for s in range(6)] and len(b["metrics"]["step"]) == 8
    assert a["solutions"]["file"] == "solutions.jsonl.gz" and b["solutions"]["file"] is None
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "saved no student solutions" in page
    if A._plt() is not None:
        assert "fig_curves.png" in rep["figures"]


def test_hostile_strings_are_escaped_in_the_report(tmp_path):
    """A model path, a run directory, concepts, problems, answers and solutions that carry markup."""
    import shutil

    evil = '<img src=x onerror=alert(1)>'
    run = tmp_path / f"_run$1{evil}"  # `$` starts mathtext in a figure label, `_` hides a legend entry
    rows = [_row(1, "What is 2 + 3?</td><script>alert(2)</script>", concepts=["<script>alert(3)</script>"]),
            _row(2, "What is 4 + 4?", concepts=["addition"])]
    rows[0]["majority"] = "<script>alert(4)</script>"
    os.makedirs(run)
    (run / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text(json.dumps({"model": "<script>alert(5)</script>", "seed": 0}))
    (run / "solutions.jsonl").write_text(json.dumps({"step": 1, "round": 0, "problem": "<script>alert(6)</script>",
                                                     "majority": "<b>", "answers": ["<i>"],
                                                     "solutions": ["</pre><script>alert(7)</script>"]}) + "\n")
    model = tmp_path / f"model{evil}"
    shutil.copytree(tiny_path(), model)
    A.main([str(run), "--out", str(tmp_path / "rep"), "--quiet", "--frozen-model", str(model),
            "--frozen-problems", "2", "--frozen-samples", "2", "--frozen-max-new-tokens", "8",
            "--difficulty", "toy", "--truth", "toy"])
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "<script" not in page and "<img src=x" not in page and "<i>" not in page  # the page has no <i> of its own
    assert "&lt;script&gt;alert(" in page and "&lt;b&gt;" in page and html_escaped(evil) in page
    for k in range(1, 8):
        assert f"alert({k})" in page, k  # shown, as text


def html_escaped(s):
    import html
    return html.escape(s, quote=True)
