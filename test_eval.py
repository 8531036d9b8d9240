"""Tests of eval.py (the answer checker has test_checker.py). Fast, CPU only, no network:
benchmark rows are small fixtures in each public copy's layout, written to a tmp dir."""
import json
import os

import pytest

import eval as ev
from checker import answers_equal
from opensir import final_answer

# ------------------------------------------------------------------------------------------------
# Fixture rows, one benchmark layout each (fields as in the public copies)
# ------------------------------------------------------------------------------------------------

ROWS = {
    "gsm8k": [
        {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3+4=<<3+4=7>>7\n#### 7", "idx": 0},
        {"question": "A house costs $80,000 and repairs $50,000. Total?", "answer": "So 130,000\n#### 130,000", "idx": 1},
        {"question": "What is 10 minus 12?", "answer": "10-12=-2\n#### -2", "idx": 2},
        {"question": "What is 1+1?", "answer": "#### 2", "idx": 3},
    ],
    "math500": [{"problem": "Convert $(0,3)$ to polar.", "solution": "... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
                 "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
                 "unique_id": "test/precalculus/807.json"}],
    "minerva_math": [{"problem": "Find s.", "solution": "First $\\boxed{2}$ then \\[ s=\\boxed{1.6} \\mathrm{~cm} \\]",
                      "type": "Astronomy", "idx": 0}],
    "olympiadbench": [{"id": 1, "subfield": "Number Theory", "context": None, "question": "Find all pairs.",
                       "solution": ["..."], "final_answer": ["$(1,8,19), (2,7,13)$"], "is_multiple_answer": True,
                       "unit": None, "answer_type": "Tuple", "error": None}],
    "college_math": [{"data_source": "college_math.algebra", "question_number": "exercise.1.8.9",
                      "question": "Simplify: $-10-4(n-5)$", "answer": "$10-4 n$", "license": "CC BY 3.0",
                      "data_topic": "college_math.algebra"}],
}
GOLDS = {"gsm8k": ["7", "130000", "-2", "2"], "math500": ["\\left( 3, \\frac{\\pi}{2} \\right)"],
         "minerva_math": ["1.6"], "olympiadbench": ["$(1,8,19), (2,7,13)$"], "college_math": ["$10-4 n$"]}


def write_rows(d, name, rows):
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{name}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


@pytest.mark.parametrize("name", list(ROWS))
def test_gold_extraction_per_layout(tmp_path, name):
    probs = ev.load_benchmark(name, write_rows(tmp_path, name, ROWS[name]))
    assert [p.gold for p in probs] == GOLDS[name]
    assert [p.id for p in probs] == list(range(len(ROWS[name])))
    assert probs[0].problem == ROWS[name][0][ev.BENCHMARKS[name].problem_field]
    assert answers_equal(GOLDS[name][0], probs[0].gold)  # every gold is equal to itself


def test_limit_and_malformed_line(tmp_path):
    path = write_rows(tmp_path, "gsm8k", ROWS["gsm8k"])
    assert len(ev.load_benchmark("gsm8k", path, limit=2)) == 2
    with open(path, "a") as f:
        f.write('{"question": "broken",\n')
    with pytest.raises(ValueError, match=r"gsm8k\.jsonl, line 5: not valid JSON"):
        ev.load_benchmark("gsm8k", path)
    write_rows(tmp_path, "math500", [{"problem": "p"}])
    with pytest.raises(ValueError, match=r"math500\.jsonl, line 1: missing field.*'answer'"):
        ev.load_benchmark("math500", str(tmp_path / "math500.jsonl"))


# ------------------------------------------------------------------------------------------------
# Data: local copies, downloads (file:// URLs), clear errors
# ------------------------------------------------------------------------------------------------


def test_download_once_into_cache(tmp_path):
    src = write_rows(tmp_path / "public", "gsm8k", ROWS["gsm8k"])
    cache = str(tmp_path / "cache")
    path = ev.benchmark_file("gsm8k", None, cache, url="file://" + os.path.abspath(src))
    assert path == os.path.join(cache, "gsm8k.jsonl")
    assert [p.gold for p in ev.load_benchmark("gsm8k", path)] == GOLDS["gsm8k"]
    os.remove(src)  # second time round the cache answers; no download is attempted
    assert ev.benchmark_file("gsm8k", None, cache, url="file:///nonexistent") == path
    local = write_rows(tmp_path / "mine", "gsm8k", ROWS["gsm8k"][:1])  # --data-dir wins over the cache
    assert ev.benchmark_file("gsm8k", str(tmp_path / "mine"), cache) == local


def test_download_failure_says_where_to_put_the_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ev.benchmark_file("math500", str(tmp_path / "data"), str(tmp_path / "cache"),
                          url="file://" + str(tmp_path / "missing.jsonl"))
    msg = str(err.value)
    assert "download failed" in msg and str(tmp_path / "data" / "math500.jsonl") in msg and "'problem'" in msg
    assert not os.path.exists(tmp_path / "cache" / "math500.jsonl")  # nothing half-written


def run_main(args, capsys):
    with pytest.raises(SystemExit) as err:
        ev.main(args)
    return str(err.value.code), capsys.readouterr()


def test_cli_errors_before_any_model_loads(tmp_path, capsys):
    # the model name is bogus on purpose: every error must come before loading is attempted
    msg, _ = run_main(["--model", "no/such-model", "--benchmarks", "gsm8k,aime"], capsys)
    assert "unknown benchmark(s) ['aime']" in msg and "college_math" in msg
    d = tmp_path / "data"
    write_rows(d, "gsm8k", ROWS["gsm8k"])
    with open(d / "gsm8k.jsonl", "a") as f:
        f.write("not json\n")
    msg, _ = run_main(["--model", "no/such-model", "--benchmarks", "gsm8k", "--data-dir", str(d)], capsys)
    assert "gsm8k.jsonl, line 5: not valid JSON" in msg
    msg, _ = run_main(["--model", "no/such-model", "--benchmarks", "minerva_math", "--data-dir", str(d),
                       "--cache-dir", str(tmp_path / "c"), "--no-download"], capsys)
    assert str(d / "minerva_math.jsonl") in msg and "downloads are off" in msg
    msg, _ = run_main(["--model", "gemma2b", "--benchmarks", "gsm8k", "--data-dir", str(d)], capsys)
    assert "unknown model 'gemma2b'" in msg and "gemma-2-2b-it" in msg


def test_second_eval_into_the_same_out_refuses(tmp_path, capsys):
    """An eval holding OUT/.lock (here: this test, through its own open file) makes a second refuse before
    it reads or repairs samples.jsonl; once the lock is gone the same command gets past the check."""
    import fcntl
    d, out = tmp_path / "data", tmp_path / "out"
    write_rows(d, "gsm8k", ROWS["gsm8k"])
    out.mkdir()
    row = json.dumps({"benchmark": "gsm8k", "id": 0, "sample": 0, "completion": "", "extracted": None,
                      "gold": "1", "correct": False, "truncated": False, "tokens": 0})
    torn = row + "\n" + '{"benchmark": "gsm8k", "id": 0, "sa'  # a killed eval's torn last line
    (out / "samples.jsonl").write_text(torn)
    # the model is never loaded here: a directory keeps the hub check quiet
    args = ["--model", str(tmp_path), "--benchmarks", "gsm8k", "--data-dir", str(d), "--out", str(out)]
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        msg, _ = run_main(args, capsys)
        assert "another run is writing to" in msg and str(out) in msg
        assert (out / "samples.jsonl").read_text() == torn  # not repaired under another run's feet
    msg, _ = run_main(args, capsys)  # unlocked: the torn line is dropped, then --resume is asked for
    assert "pass --resume" in msg and (out / "samples.jsonl").read_text() == row + "\n"


# ------------------------------------------------------------------------------------------------
# Scoring, compare
# ------------------------------------------------------------------------------------------------


def test_score_standard_error_over_problems():
    samples = [{"id": i, "correct": c, "extracted": "1"} for i, cs in enumerate([[1, 1], [1, 0], [0, 0]]) for c in cs]
    r = ev.score(samples)
    # per-problem accuracies 1, .5, 0: mean .5, sd .5, se .5/sqrt(3)
    assert r["score"] == pytest.approx(50.0) and r["se"] == pytest.approx(50 / 3 ** 0.5)
    assert (r["problems"], r["samples"]) == (3, 6)


def test_compare_two_summaries_without_per_problem_scores_is_unpaired(tmp_path, capsys):
    def summary(scores):
        return {"benchmarks": {b: {"score": s, "se": 1.0} for b, s in scores.items()},
                "average": {"score": sum(scores.values()) / len(scores), "se": 0.5}}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text(json.dumps(summary({"gsm8k": 40.0, "math500": 20.0})))
    (tmp_path / "b.json").write_text(json.dumps(summary({"gsm8k": 45.5, "math500": 18.0})))
    ev.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b.json")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["benchmark", "a", "b"]  # an --out dir's name, a file's name less .json
    assert lines[1].split() == ["gsm8k", "40.0", "±", "1.0", "45.5", "±", "1.0"]
    diff = lines[lines.index("") + 3:]
    # unpaired: se of the difference sqrt(1^2 + 1^2) = 1.4; the average's from the benchmarks' / 2 = 0.7
    assert diff[0].split() == ["gsm8k", "+5.5", "±", "1.4", "u"]
    assert diff[1].split() == ["math500", "-2.0", "±", "1.4", "u"]
    assert diff[2].split() == ["average", "+1.8", "±", "1.0", "u"]  # 31.75 - 30.0; sqrt(2 + 2) / 2


def scored_run(d, accs, problem_text="p"):
    """An --out dir whose summary.json is summarize() of 2 samples a problem with the given per-problem
    accuracies (1, .5 or 0) on gsm8k."""
    problems = [ev.Problem("gsm8k", i, f"{problem_text}{i}", str(i)) for i in range(len(accs))]
    samples = [{"benchmark": "gsm8k", "id": i, "sample": k, "correct": k < round(2 * a), "extracted": "1"}
               for i, a in enumerate(accs) for k in range(2)]
    d.mkdir()
    (d / "summary.json").write_text(json.dumps(ev.summarize(samples, ["gsm8k"], problems)))
    return str(d)


def test_compare_pairs_by_problem_when_the_problems_match(tmp_path, capsys):
    a = scored_run(tmp_path / "a", [1, .5, 0])
    b = scored_run(tmp_path / "b", [1, 1, .5])  # same problems: paired
    c = scored_run(tmp_path / "c", [1, 1, .5], problem_text="other")  # other problems: unpaired
    got = ev.main(["--compare", a, b, c])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["benchmark", "a", "b", "c"]
    assert lines[1].split() == ["gsm8k", "50.0", "±", "28.9", "83.3", "±", "16.7", "83.3", "±", "16.7"]
    # paired: differences 0, 50, 50: mean 33.3, sd 28.87, se 28.87 / sqrt(3) = 16.67
    # unpaired: sqrt(28.87^2 + 16.67^2) = 33.33
    b_diff, c_diff = got["differences"]
    assert b_diff["gsm8k"]["paired"] and b_diff["gsm8k"]["delta"] == pytest.approx(100 / 3)
    assert b_diff["gsm8k"]["se"] == pytest.approx(50 / 3)
    assert not c_diff["gsm8k"]["paired"] and c_diff["gsm8k"]["se"] == pytest.approx(100 / 3)
    diff = lines[lines.index("") + 2:]
    assert diff[0].split() == ["benchmark", "b", "-", "a", "c", "-", "a"]
    assert diff[1].split() == ["gsm8k", "+33.3", "±", "16.7", "p", "+33.3", "±", "33.3", "u"]


# ------------------------------------------------------------------------------------------------
# End to end with the tiny model: table, JSONL, summary, resume
# ------------------------------------------------------------------------------------------------


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_eval_tiny_end_to_end_and_resume(tmp_path, capsys):
    d = tmp_path / "data"
    write_rows(d, "gsm8k", ROWS["gsm8k"])
    write_rows(d, "math500", ROWS["math500"] * 2)
    out = str(tmp_path / "out")
    base = ["--model", "tiny", "--data-dir", str(d), "--benchmarks", "gsm8k,math500", "--out", out,
            "--max-new-tokens", "24", "--device", "cpu", "--no-download"]
    summary = ev.main(base + ["--n", "2", "--limit", "3"])
    printed = capsys.readouterr().out
    samples = read_jsonl(os.path.join(out, "samples.jsonl"))
    # 3 gsm8k problems + 2 math500 problems (only 2 rows), 2 samples each
    assert sorted((s["benchmark"], s["id"], s["sample"]) for s in samples) == sorted(
        [("gsm8k", i, k) for i in range(3) for k in range(2)] + [("math500", i, k) for i in range(2) for k in range(2)])
    for s in samples:
        assert set(s) >= {"benchmark", "id", "sample", "completion", "extracted", "gold", "correct"}
        assert s["extracted"] == final_answer(s["completion"])
        assert s["correct"] == answers_equal(s["extracted"], s["gold"])
        assert s["gold"] == GOLDS[s["benchmark"]][s["id"] % len(GOLDS[s["benchmark"]])]
    on_disk = json.load(open(os.path.join(out, "summary.json")))
    assert on_disk["benchmarks"] == summary["benchmarks"]
    for b in ("gsm8k", "math500"):
        mine = [s for s in samples if s["benchmark"] == b]
        assert on_disk["benchmarks"][b]["score"] == pytest.approx(100 * sum(s["correct"] for s in mine) / len(mine))
        assert on_disk["benchmarks"][b]["samples"] == len(mine)
    avg = (on_disk["benchmarks"]["gsm8k"]["score"] + on_disk["benchmarks"]["math500"]["score"]) / 2
    assert on_disk["average"]["score"] == pytest.approx(avg)
    table = printed.splitlines()
    head = next(i for i, line in enumerate(table) if line.startswith("benchmark"))
    assert [line.split()[0] for line in table[head + 1:head + 4]] == ["gsm8k", "math500", "average"]
    assert table[head + 1].split()[1:3] == ["3", "6"]
    assert f"{on_disk['average']['score']:.1f}" in table[head + 3]

    # a second run without --resume refuses to clobber; with it, nothing is regenerated
    msg, _ = run_main(base + ["--n", "2", "--limit", "3"], capsys)
    assert "--resume" in msg
    ev.main(base + ["--n", "2", "--limit", "3", "--resume"])
    assert "0 to generate" in capsys.readouterr().out
    assert len(read_jsonl(os.path.join(out, "samples.jsonl"))) == len(samples)
    # a larger --limit only adds the missing problem's samples, never a duplicate
    ev.main(base + ["--n", "2", "--limit", "4", "--resume"])
    again = read_jsonl(os.path.join(out, "samples.jsonl"))
    keys = [(s["benchmark"], s["id"], s["sample"]) for s in again]
    assert len(keys) == len(set(keys)) == len(samples) + 2
    assert again[:len(samples)] == samples


# ------------------------------------------------------------------------------------------------
# Reproducible resume, Ctrl-C, links in --out, bad values, wrong-typed golds, every checkpoint
# ------------------------------------------------------------------------------------------------


def tiny_args(tmp_path, out, *extra):
    d = tmp_path / "data"
    if not d.exists():
        write_rows(d, "gsm8k", ROWS["gsm8k"])
        write_rows(d, "math500", ROWS["math500"] * 3)
    return ["--model", "tiny", "--data-dir", str(d), "--benchmarks", "gsm8k,math500", "--out", str(out),
            "--max-new-tokens", "16", "--device", "cpu", "--no-download", "--n", "3", "--batch-size", "4", *extra]


def test_resume_after_an_interruption_equals_an_uninterrupted_eval(tmp_path, capsys, monkeypatch):
    import opensir
    whole = tmp_path / "whole"
    ev.main(tiny_args(tmp_path, whole))
    expected = (whole / "samples.jsonl").read_text()
    # 4 gsm8k problems x 3 = 12 samples in chunks of 4, 3 math500 problems x 3 = 9 in chunks of 4, 4, 1
    assert len(expected.splitlines()) == 21

    real, calls = opensir.generate, []

    def interrupted_on_the_third_call(*a, **k):  # Ctrl-C while the third chunk generates
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    cut = tmp_path / "cut"
    monkeypatch.setattr(opensir, "generate", interrupted_on_the_third_call)
    args = tiny_args(tmp_path, cut)
    with pytest.raises(SystemExit) as err:
        ev.main(args)
    assert err.value.code == 130
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("eval.py")]  # less the progress bars
    assert "Traceback" not in err and said == [f"eval.py: interrupted; 8 samples kept in {cut / 'samples.jsonl'}. To continue: python eval.py "
                    + " ".join(args) + " --resume"]
    monkeypatch.setattr(opensir, "generate", real)
    kept = (cut / "samples.jsonl").read_text().splitlines()
    assert kept == expected.splitlines()[:8]
    # a kill in the middle of writing a chunk: its last sample lost, the one before torn
    (cut / "samples.jsonl").write_text("\n".join(kept[:6]) + "\n" + kept[6][:20])
    ev.main(args + ["--resume"])
    assert (cut / "samples.jsonl").read_text() == expected  # sample for sample, in the same order
    assert json.loads((cut / "summary.json").read_text())["benchmarks"] == \
        json.loads((whole / "summary.json").read_text())["benchmarks"]


def test_ctrl_c_in_a_real_process_prints_one_line_and_its_command_continues(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    here = os.path.dirname(os.path.abspath(__file__))
    out = tmp_path / "out"
    args = tiny_args(tmp_path, out, "--batch-size", "1", "--n", "12")  # 84 chunks: time to interrupt
    proc = subprocess.Popen([sys.executable, os.path.join(here, "eval.py"), *args], cwd=here,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = out / "samples.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (path.exists() and path.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith("eval.py")]  # less the progress bars
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert lines[0].startswith("eval.py: interrupted; ") and " samples kept in " in lines[0]
    command = lines[0].split("To continue: ", 1)[1]
    assert command.startswith("python eval.py ") and command.endswith(" --resume")
    kept = path.read_text().count("\n")
    assert 2 <= kept < 84
    import shlex
    ev.main(shlex.split(command)[2:])  # the command it printed, as given
    whole = tmp_path / "whole"
    ev.main(tiny_args(tmp_path, whole, "--batch-size", "1", "--n", "12"))
    assert path.read_text() == (whole / "samples.jsonl").read_text()


@pytest.mark.parametrize("name", ["samples.jsonl", "summary.json", "settings.json", ".lock"])
def test_a_link_planted_in_out_is_refused_and_its_target_untouched(tmp_path, capsys, name):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(target, out / name)
    msg, _ = run_main(tiny_args(tmp_path, out), capsys)
    assert f"{out / name} is a symbolic link" in msg and "another --out" in msg
    assert target.read_text() == "precious\n" and os.path.islink(out / name)


@pytest.mark.parametrize("flag,value", [
    ("--n", "0"), ("--limit", "-1"), ("--batch-size", "0"), ("--max-new-tokens", "0"), ("--temperature", "-0.5"),
    ("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"),
    ("--top-k", "-1"), ("--kv-cache-gib", "nan"), ("--kv-cache-gib", "-1"), ("--seed", "-1")])
def test_bad_values_are_refused_naming_the_flag_before_anything_loads(tmp_path, capsys, flag, value):
    # a bogus model and no data: any later check would say something else
    msg, _ = run_main(["--model", "no/such-model", "--benchmarks", "gsm8k", "--data-dir", str(tmp_path),
                       "--no-download", "--out", str(tmp_path / "out"), flag, value], capsys)
    assert msg.startswith(f"eval.py: {flag} must be") and f"(got {float(value) if '.' in value or value.isalpha() else value}" in msg
    assert not (tmp_path / "out").exists()


def test_unknown_dtype_is_refused_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        ev.main(["--model", "tiny", "--dtype", "foo"])
    assert err.value.code == 2 and "--dtype: invalid choice: 'foo'" in capsys.readouterr().err


def test_wrong_typed_golds_are_coerced_or_skipped_and_counted(tmp_path, capsys):
    rows = [{"problem": "a", "answer": 7}, {"problem": "b", "answer": 2.50}, {"problem": "c", "answer": 3.0},
            {"problem": "d", "answer": None}, {"problem": "e", "answer": ["1", 2]}, {"problem": "f", "answer": []},
            {"problem": "g", "answer": {"x": 1}}, {"problem": "h", "answer": True}, {"problem": None, "answer": "1"},
            {"problem": "i", "answer": float("nan")}, {"problem": 12, "answer": " 5 "}]
    path = tmp_path / "math500.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes NaN as NaN, which it reads back
    skipped = {}
    probs = ev.load_benchmark("math500", str(path), skipped=skipped)
    assert [(p.id, p.problem, p.gold) for p in probs] == [
        (0, "a", "7"), (1, "b", "2.5"), (2, "c", "3"), (4, "e", "1, 2"), (10, "12", " 5 ")]  # strings kept as they are
    assert skipped == {"math500": 6}
    assert "math500: skipped 6 row(s)" in capsys.readouterr().err
    write_rows(tmp_path, "aime24", [{"problem": "p", "answer": None}, {"problem": "q", "answer": 204}])
    assert [p.gold for p in ev.load_benchmark("aime24", str(tmp_path / "aime24.jsonl"))] == ["204"]  # never "None"
    write_rows(tmp_path, "gsm8k", [{"question": "q", "answer": 18}, {"question": "r", "answer": ["#### 3"]}])
    assert [(p.id, p.gold) for p in ev.load_benchmark("gsm8k", str(tmp_path / "gsm8k.jsonl"))] == [(0, "18"), (1, "#### 3")]
    write_rows(tmp_path, "minerva_math", [{"problem": "q", "solution": 5}, {"problem": "r", "solution": "so $\\boxed{4}$"}])
    assert [(p.id, p.gold) for p in ev.load_benchmark("minerva_math", str(tmp_path / "minerva_math.jsonl"))] == [(1, "4")]


def test_all_checkpoints_evaluates_each_into_its_own_dir_and_prints_one_table(tmp_path, capsys):
    import opensir
    model, tok = opensir.load_model("tiny", device="cpu")
    run = tmp_path / "run"
    for step in (2, 4):
        ck = run / f"ckpt-{step:05d}"
        model.save_pretrained(ck)
        tok.save_pretrained(ck)
        (ck / "state.pt").write_bytes(b"")
    (run / "ckpt-00006").mkdir()  # incomplete (no state.pt): left out
    out = tmp_path / "out"
    args = tiny_args(tmp_path, out)
    args[args.index("tiny")] = str(run)
    table = ev.main(args + ["--all-checkpoints", "--n", "1"])
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["checkpoints.json", "ckpt-00002", "ckpt-00004"]
    for step in (2, 4):
        summary = json.loads((out / f"ckpt-{step:05d}" / "summary.json").read_text())
        assert summary["settings"]["model"] == str(run / f"ckpt-{step:05d}")
        assert table["checkpoints"][str(step)]["gsm8k"]["score"] == summary["benchmarks"]["gsm8k"]["score"]
        assert table["checkpoints"][str(step)]["average"] == summary["average"]
    assert json.loads((out / "checkpoints.json").read_text()) == table
    rows = printed[printed.index("    step"):].splitlines()
    assert rows[0].split() == ["step", "gsm8k", "math500", "average"]
    assert [r.split()[0] for r in rows[1:3]] == ["2", "4"]
    g = table["checkpoints"]["2"]["gsm8k"]
    assert rows[1].split()[1:4] == [f"{g['score']:.1f}", "±", f"{g['se']:.1f}"]
    # the same command again refuses to clobber; with --resume nothing is regenerated
    msg, _ = run_main(args + ["--all-checkpoints", "--n", "1"], capsys)
    assert "pass --resume" in msg
    before = (out / "ckpt-00004" / "samples.jsonl").read_text()
    assert ev.main(args + ["--all-checkpoints", "--n", "1", "--resume"]) == table
    assert capsys.readouterr().out.count("0 to generate") == 2
    assert (out / "ckpt-00004" / "samples.jsonl").read_text() == before


def test_all_checkpoints_refuses_a_link_planted_as_a_checkpoint_dir(tmp_path, capsys):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    (run / "ckpt-00002").mkdir(parents=True)
    (run / "ckpt-00002" / "state.pt").write_bytes(b"")
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(elsewhere, out / "ckpt-00002")
    args = tiny_args(tmp_path, out)
    args[args.index("tiny")] = str(run)
    msg, _ = run_main(args + ["--all-checkpoints"], capsys)
    assert f"{out / 'ckpt-00002'} is a symbolic link" in msg and os.listdir(elsewhere) == []
    msg, _ = run_main(args[:1] + [str(tmp_path / "data")] + args[2:] + ["--all-checkpoints"], capsys)
    assert "--all-checkpoints needs --model RUN_DIR" in msg
