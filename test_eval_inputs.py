"""Tests of eval.py's inputs: the benchmark sets of each recipe, AIME from local copies, a benchmark file
that holds no problems, bad flags, and --compare's warnings when two summaries are not comparable."""
import json
import os
import shutil

import pytest

import eval as ev
from checker import answers_equal as checker_equal
from conftest import HERE, data_dir, eval_exit

# a real copy of AIME 2024 (Qwen2.5-Math layout), where the development machine keeps one; else fixture rows
AIME24 = next((p for p in (os.path.join(HERE, *up, "shared", "benchmarks", "aime24.jsonl") for up in ([".."], ["..", ".."]))
               if os.path.exists(p)), None)
AIME24_ROWS = [  # the layout of the public copy: id, problem, solution, answer (a string), url
    {"id": 60, "problem": "Find the number of minutes the walk takes her.", "solution": "... $\\boxed{204}$",
     "answer": "204", "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_1"},
    {"id": 70, "problem": "Find the remainder when N is divided by 1000.", "solution": "...", "answer": "025",
     "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_11"},
]


def test_eval_benchmark_sets():
    assert ev.benchmark_names("code") == ["gsm8k", "math500", "minerva_math", "olympiadbench", "college_math"]
    assert ev.benchmark_names("paper") == ev.benchmark_names("code") + ["aime24", "aime25"]
    assert ev.benchmark_names("gsm8k, aime24") == ["gsm8k", "aime24"]
    assert set(ev.benchmark_names("paper")) == set(ev.BENCHMARKS)
    default = ev.build_parser().parse_args(["--model", "x/y"]).benchmarks  # the default is the first version's 5
    assert default.split(",") == ev.BENCHMARK_SETS["code"]
    assert ev.build_parser().parse_args(["--benchmarks", "paper"]).benchmarks.split(",") == ev.BENCHMARK_SETS["paper"]
    assert "first version's 5" in ev.set_description(ev.BENCHMARK_SETS["code"])
    assert "later version's 7" in ev.set_description(ev.BENCHMARK_SETS["paper"])


def test_eval_scores_aime_from_local_copies(tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    if AIME24:
        shutil.copy(AIME24, d / "aime24.jsonl")
    else:
        (d / "aime24.jsonl").write_text("".join(json.dumps(r) + "\n" for r in AIME24_ROWS))
    probs = ev.load_benchmark("aime24", str(d / "aime24.jsonl"))
    assert len(probs) == (30 if AIME24 else 2) and all(p.gold.isdigit() for p in probs)
    assert checker_equal("25", [p.gold for p in probs if p.gold.endswith("25")][0])  # `025` is 25
    # AIME 2025 in the layout of its public copy (problem, answer, id), answers as numbers or strings
    rows = [{"id": "2025-I-1", "problem": "Find the sum of all integer bases b > 9 for which 17_b divides 97_b.",
             "answer": 70}, {"id": "2025-I-2", "problem": "What is 1+1?", "answer": "2"}]
    (d / "aime25.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.gold for p in ev.load_benchmark("aime25", str(d / "aime25.jsonl"))] == ["70", "2"]
    summary = ev.main(["--model", "tiny", "--data-dir", str(d), "--no-download", "--benchmarks", "aime24,aime25",
                       "--limit", "2", "--n", "1", "--out", str(tmp_path / "out")])
    assert [(b, r["problems"], r["samples"]) for b, r in summary["benchmarks"].items()] == \
        [("aime24", 2, 2), ("aime25", 2, 2)]
    assert "evaluating aime24, aime25: a subset you chose" in capsys.readouterr().out
    (d / "aime25.jsonl").unlink()  # offline and no local copy: the error says where to get one
    with pytest.raises(SystemExit, match="aime25.jsonl; the public copy is https://huggingface.co/datasets/math-ai"):
        ev.main(["--model", "tiny", "--data-dir", str(d), "--cache-dir", str(tmp_path / "c"), "--no-download",
                 "--benchmarks", "aime25", "--out", str(tmp_path / "out2")])


def test_empty_benchmark_file_is_an_error_before_loading(tmp_path):
    """An empty benchmark file is an error, not a 0 averaged into the headline."""
    d = data_dir(tmp_path, rows=[])
    msg = eval_exit(["--model", "tiny", "--data-dir", d, "--benchmarks", "gsm8k", "--out", str(tmp_path / "o")])
    assert "gsm8k.jsonl holds no problems" in msg and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, msg", [(["--limit", "0"], "--limit must be >= 1"),
                                        (["--temperature", "nan"], "finite --temperature")])
def test_eval_flag_checks(tmp_path, flags, msg):
    assert msg in eval_exit(["--model", "tiny", "--data-dir", data_dir(tmp_path), "--benchmarks", "gsm8k", *flags])


def test_compare_warns_when_benchmarks_or_settings_differ(tmp_path, capsys):
    def summary(scores, problems, temperature):
        return {"settings": {"model": "m", "temperature": temperature, "n": 16},
                "benchmarks": {b: {"score": s, "se": 1.0, "problems": problems} for b, s in scores.items()},
                "average": {"score": sum(scores.values()) / len(scores), "se": 0.5}}
    (tmp_path / "a.json").write_text(json.dumps(summary({"gsm8k": 40.0, "math500": 20.0}, 50, 0.6)))
    (tmp_path / "b.json").write_text(json.dumps(summary({"gsm8k": 45.0}, 10, 1.0)))
    (tmp_path / "c.json").write_text(json.dumps(summary({"gsm8k": 41.0, "math500": 21.0}, 50, 0.6)))
    ev.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert "only in A: ['math500']" in err and "gsm8k (50 vs 10)" in err and "temperature 0.6 vs 1.0" in err
    ev.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")])
    assert "warning" not in capsys.readouterr().err
