"""Tests of the two recipes (`--recipe code|paper`, SPEC "Two recipes") and of the fixes that bring both
closer to the authors' code: hand-computed oracles for the paper's equations, the inputs that exposed
each fix, preset/flag precedence, refusals, a real 2-step tiny run of each recipe, and AIME in eval.py."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

import eval as ev
import opensir as O
from checker import answers_equal as checker_equal

_HERE = os.path.dirname(os.path.abspath(__file__))
# a real copy of AIME 2024 (Qwen2.5-Math layout), where the development machine keeps one; else fixture rows
AIME24 = next((p for p in (os.path.join(_HERE, *up, "shared", "benchmarks", "aime24.jsonl") for up in ([".."], ["..", ".."]))
               if os.path.exists(p)), None)
AIME24_ROWS = [  # the layout of the public copy: id, problem, solution, answer (a string), url
    {"id": 60, "problem": "Find the number of minutes the walk takes her.", "solution": "... $\\boxed{204}$",
     "answer": "204", "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_1"},
    {"id": 70, "problem": "Find the remainder when N is divided by 1000.", "solution": "...", "answer": "025",
     "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_11"},
]
GOOD = ("<think>uses area not sums</think>\n<problem>A square has side 3 cm. What is its area?</problem>\n"
        "<concepts>area of a square, multiplication</concepts>")


def _cfg(**kw):
    return O.Config(**kw)


def _cand(group, legal=True, answers=(), lengths=(), combined=None):
    """A candidate as play_round leaves it (before scoring): parsed output, solutions, answers."""
    parsed = O.parse_teacher(GOOD if legal else "<problem>x</problem>")
    sols = [O.Completion([1], [5] * n, "Therefore, the final answer is: $\\boxed{1}$", False) for n in lengths]
    c = O.Candidate(group, O.Completion([1], [5, 2], GOOD, False), parsed, sols, list(answers))
    if combined is not None:  # a scored candidate with a given ranking key
        c.combined, c.n_parsed = combined, (8 if legal else 0)
    return c


# ------------------------------------------------------------------------------------------------
# the paper's equations: hand-computed oracles
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s, expected", [(4 / 8, 0.125), (5 / 8, 0.671875), (6 / 8, 0.78125), (7 / 8, 0.234375),
                                         (3 / 8, 0.0), (1.0, 0.0), (0.7, 1.0)])
def test_paper_tent_floor_one_over_g(s, expected):
    # eta = (1 - 1/8) / 0.2 = 4.375;  R = 1 - eta |s - 0.7|
    assert O.solvability_reward(s, 8, 0.5, 0.9, floor="group") == pytest.approx(expected)
    assert O.band_y_min(8, 0.5, 0.9, floor="group") == 0.125
    assert O.band_y_min(8, 0.5, 0.9, floor="band") == 0.25  # the code recipe's floor is unchanged


def test_paper_solve_rate_over_the_whole_group():
    answers = ["4", "4", None, "4", "5", None, "4", None]  # 4 of 5 parsed agree; 4 of 8 attempts
    assert O.majority_vote(answers, "parsed") == ("4", 4 / 5, 5)
    assert O.majority_vote(answers, "group") == ("4", 4 / 8, 5)
    assert O.majority_vote([None] * 8, "group") == (None, 0.0, 0)
    # 0.8 is in the band for code, 0.5 is its lower edge for paper: same answers, different rewards
    c, p = _cand(0, answers=answers, lengths=[3] * 8), _cand(0, answers=answers, lengths=[3] * 8)
    O.score_candidates([c], None, _cfg(w_div=0))
    O.score_candidates([p], None, _cfg(w_div=0, solve_rate_over="group", tent_floor="group"))
    assert c.solv == pytest.approx(1 - 0.75 * 0.1 / 0.2) and p.solv == pytest.approx(0.125)


def test_paper_nearest_neighbour_distance():
    pool = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    cand = torch.tensor([[3.0, 0.0, 0.0],  # a duplicate (scaled) of pool[0]: distance 0
                         [0.0, -2.0, 0.0],  # opposite to pool[1], orthogonal to pool[0]: nearest is pool[0], 1
                         [-1.0, -1.0, 0.0],  # opposite to the pool's mean direction: both cos -1/sqrt2
                         [1.0, 1.0, 0.0]])  # between both: 1 - 1/sqrt2
    d = O.nearest_distance(cand, pool, center=False)
    assert d.tolist() == pytest.approx([0.0, 1.0, 1 + 2 ** -0.5, 1 - 2 ** -0.5], abs=1e-6)
    assert O.nearest_distance(-pool[:1], pool[:1], center=False).item() == pytest.approx(2.0)  # opposite: 2
    assert O.nearest_distance(pool[:1], pool[:1], center=False).item() == pytest.approx(0.0)  # duplicate: 0
    # candidates are not compared with each other (a duplicate pair far from the pool stays far)
    two = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert O.nearest_distance(two, pool, center=False).tolist() == pytest.approx([1.0, 1.0])
    assert O.nearest_distance(two, torch.zeros(0, 3), center=False).tolist() == [1.0, 1.0]  # empty pool
    cen = O.nearest_distance(cand + 5.0, pool + 5.0, center=True)  # centering removes a shared offset
    assert torch.allclose(cen, O.nearest_distance(cand, pool, center=True), atol=1e-5)
    assert ((cen >= 0) & (cen <= 2)).all()


def test_paper_formats():
    assert O.teacher_format_reward(O.parse_teacher(GOOD), "think") == 1.0
    no_think = O.parse_teacher("<problem>What is 12 + 30?</problem><concepts>addition of numbers</concepts>")
    assert O.teacher_format_reward(no_think, "think") == 0.0
    assert O.teacher_format_reward(no_think, "tags") == 1.0  # valid tags are the paper's format
    boxed_mid = "The answer is \\boxed{3} as shown.\nDone."
    assert O.student_format_reward(boxed_mid, "final_line") == 0.0
    assert O.student_format_reward(boxed_mid, "boxed") == 1.0
    assert O.student_format_reward("The answer is 3.", "boxed") == 0.0


def test_paper_ranks_by_the_full_teacher_score():
    # a has the larger solv + div, b the larger total (its solutions are long)
    a = _cand(0, answers=["1"] * 6 + ["2"] * 2, lengths=[10] * 8)
    b = _cand(0, answers=["1"] * 5 + ["2"] * 3, lengths=[1000] * 8)
    for key, winner in (("combined", 0), ("total", 1)):
        cands = [dataclasses.replace(a), dataclasses.replace(b)]
        O.score_candidates(cands, None, _cfg(w_div=0, select_key=key))
        assert O.select_student_problem(cands) == winner
    assert cands[1].combined == pytest.approx(cands[1].reward)


# ------------------------------------------------------------------------------------------------
# selection: per round (code) and per step (paper)
# ------------------------------------------------------------------------------------------------

def _step_batch():
    """Two rounds of four reference groups (g = 2): 8 groups. Round 0 holds the two most varied groups
    and the two best problems, round 1 weaker ones; per-round selection must take one of each round."""
    keys = [[(0.0, 2.0), (0.0, 1.5), (0.5, 0.5), (0.1, 0.1)],  # round 0: variances 1, 0.5625, 0, 0
            [(0.2, 0.4), (0.3, 0.3), (0.0, 0.1), (0.3, 0.3)]]  # round 1: 0.01, 0, 0.0025, 0
    return [[_cand(j, combined=k) for j, pair in enumerate(rnd) for k in pair] for rnd in keys]


def test_step_selection_differs_from_round_selection():
    rounds = _step_batch()
    per_round = O.select_for_training(rounds, _cfg(teacher_group=2))
    assert per_round == [([0], [1]), ([0], [1])]  # one group and one problem in each round
    per_step = O.select_for_training(rounds, _cfg(teacher_group=2, select_scope="step",
                                                  select_teacher_frac=0.25, select_student_frac=0.25))
    assert per_step == [([0, 1], [1, 3]), ([], [])]  # the top 2 of 8 groups and problems, all in round 0
    half = O.select_for_training(rounds, _cfg(teacher_group=2, select_scope="step"))  # default 0.5: 4 of 8
    assert [len(g) for g, _ in half] == [2, 2] and sum(len(s) for _, s in half) == 4


def test_step_selection_keeps_512_sequences_at_the_defaults():
    cfg = _cfg(select_scope="step")
    rng = np.random.default_rng(0)
    rounds = [[_cand(i // 8, combined=float(rng.random())) for i in range(cfg.n_refs * cfg.teacher_group)]
              for _ in range(cfg.rounds_per_step)]
    chosen = O.select_for_training(rounds, cfg)
    n_groups = sum(len(g) for g, _ in chosen)
    n_problems = sum(len(s) for _, s in chosen)
    assert (n_groups, n_problems) == (32, 32)
    assert n_groups * cfg.teacher_group + n_problems * cfg.student_group == 512
    per_round = O.select_for_training(rounds, _cfg())
    assert sum(len(g) for g, _ in per_round) * 8 + sum(len(s) for _, s in per_round) * 8 == 256


# ------------------------------------------------------------------------------------------------
# fixes 1 to 5 (both recipes), each with the input that exposed it
# ------------------------------------------------------------------------------------------------

def test_fix1_group_variance_over_members_with_a_score():
    # group 0: two scored members of key 1 and two illegal ones. Over all four (illegal as 0) its
    # variance is 0.25 and it won; over its scored members it is 0, so group 1 (variance 0.02) wins.
    combined = np.array([[1.0, 1.0, 0.0, 0.0], [0.2, 0.6, 0.4, 0.4]])
    scored = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=bool)
    assert combined.var(axis=1)[0] > combined.var(axis=1)[1]  # the old rule's pick
    assert O.select_teacher_group(combined, scored) == 1
    assert O.group_spread(combined, scored).tolist() == pytest.approx([0.0, 0.02])
    # a group with no scored member ranks last, even below a zero-variance one
    assert O.select_teacher_group(np.array([[0.0, 5.0], [1.0, 1.0]]), np.array([[0, 0], [1, 1]], dtype=bool)) == 1


def test_fix2_problem_with_no_parsed_answer_gets_no_length_and_is_never_selected():
    rambling = _cand(0, answers=[None] * 8, lengths=[2048] * 8)  # every solution ran to the budget, no box
    fine = _cand(1, answers=["3"] * 6 + ["4"] * 2, lengths=[20] * 8)
    emb = torch.eye(4)
    rambling.embedding, fine.embedding = emb[0], emb[1]
    cands = [rambling, fine]
    O.score_candidates(cands, emb[2:], _cfg(select_key="total"))
    assert rambling.length == 0.0 and not rambling.scored  # it was 1.0 before the fix
    assert rambling.reward == pytest.approx(rambling.div + 0.1)  # diversity and format only
    rambling.combined = fine.combined + 1.0  # even with the best ranking key...
    assert O.select_student_problem(cands) == 1  # ...it is out of both selections
    chosen = O.select_step([cands], 1, 1.0, 1.0)
    assert chosen == [([0, 1], [1])]  # its group is kept as a group (it ranks last), never as a problem


def _pool_cand(problem, majority):
    text = f"<problem>{problem}</problem><concepts>arithmetic of sums</concepts>"
    c = O.Candidate(0, O.Completion([1], [2], text, False), O.parse_teacher(text))
    c.majority, c.solve_rate = majority, 0.75
    return c


@pytest.mark.parametrize("problem, majority, kept", [
    ("Two plus two equals 4. What is 1 + 3 in this case?", "4", False),  # the input that exposed it
    ("Two plus two equals 4, so what is 1 + 3 in this case?", "4", False),
    ("Half of 1,000 apples are sold. How many apples are left over?", "500", True),
    ("A crate holds 1,000 apples. How many apples do 1 crates hold?", "1000", False),  # another spelling
    ("A recipe uses \\frac{1}{2} cup of flour per cake; how much for one cake?", "1/2", False),
    ("A bottle holds 0.5 litres of juice; what fraction of a litre is that?", "1/2", False),
    ("A rope is 4.5 metres long and is cut in half. How long is each piece?", "4", True),  # 4.5 is not 4
    ("What is 14 + 2 when you add them together and subtract 12?", "4", True),  # 14 holds no 4
    ("What is the sum of all integers from one to four inclusive?", "10", True),
])
def test_fix3_starting_pool_rejects_a_problem_that_states_its_answer(problem, majority, kept):
    assert O.starting_pool_filter(_pool_cand(problem, majority), _cfg()) is kept


def test_fix4_tags_in_any_case():
    t = O.parse_teacher("<THINK>new</THINK><Problem>A square has side 3 cm. What is its area?</Problem>"
                        "<Concepts>area of a square</Concepts>")
    assert t.legal and t.has_think and t.problem.startswith("A square")


@pytest.mark.parametrize("concepts, legal", [
    ("area of a square, multiplication", True),
    ("area of a square, multiplication,", True),  # 3 items with the empty one: still within 3
    ("area of a square, multiplication, geometry,", False),  # 4 items: the empty one counts
    ("area of a square,\rmultiplication", False),  # a carriage return: not one line
    ("area of a square,\nmultiplication", False),
    ("\narea of a square, multiplication\n", True),  # surrounding whitespace is stripped first
    (" , ", False),
])
def test_fix5_concept_items(concepts, legal):
    t = O.parse_teacher(f"<problem>A square has side 3 cm. What is its area?</problem><concepts>{concepts}</concepts>")
    assert t.legal is legal


# ------------------------------------------------------------------------------------------------
# presets, flags, refusals
# ------------------------------------------------------------------------------------------------

def test_presets_cover_every_row_and_code_is_the_default():
    assert set(O.RECIPES) == {"code", "paper"}
    assert all(set(r) == set(O.RECIPE_FIELDS) for r in O.RECIPES.values())
    assert all(O.RECIPES["code"][k] != O.RECIPES["paper"][k] for k in O.RECIPE_FIELDS)  # every row differs
    assert all(getattr(O.Config(), k) == v for k, v in O.RECIPES["code"].items())


def test_user_flags_win_over_the_preset(capsys):
    cfg = O.config_from_args(["--model", "a/b", "--recipe", "paper", "--select_scope", "round"])
    assert cfg.recipe == "paper" and cfg.select_scope == "round"  # the user's flag
    assert {k: getattr(cfg, k) for k in O.RECIPE_FIELDS if k != "select_scope"} == \
        {k: v for k, v in O.RECIPES["paper"].items() if k != "select_scope"}
    assert cfg.warmup_steps == 20
    assert "recipe paper" in capsys.readouterr().out
    # tiny: the scale-down defaults still apply over the preset (warm-up 0), the user's flags over both
    tiny = O.config_from_args(["--model", "tiny", "--recipe", "paper"])
    assert (tiny.warmup_steps, tiny.start_pool, tiny.rounds_per_step) == (0, "seed", 2)
    assert O.config_from_args(["--model", "tiny", "--recipe", "paper", "--warmup_steps", "7"]).warmup_steps == 7
    assert O.config_from_args(["--model", "a/b"]) == O.Config(model="a/b")  # code = Config's defaults


@pytest.mark.parametrize("flags, msg", [
    (["--recipe", "papr"], "--recipe"),
    (["--select_teacher_frac", "0", "--recipe", "paper"], "--select_teacher_frac"),
    (["--select_student_frac", "1.5", "--recipe", "paper"], "--select_student_frac"),
    (["--recipe", "paper", "--init_pool_size", "64"], "--init_pool_size"),  # no growth in paper
    (["--select_teacher_frac", "0.25"], "--select_teacher_frac"),  # code selects per round
    (["--recipe", "paper", "--div_topk", "3"], "--div_topk"),  # paper takes the single nearest
    (["--div_mode", "knn"], "--div_mode"),
])
def test_bad_recipe_flags_are_refused_before_any_model_loads(tmp_path, flags, msg):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=msg):
        O.main(["--model", "no/such-model", "--out", str(out), *flags])
    assert not out.exists()


def test_init_pool_file_contradicts_the_seed_start(tmp_path):
    f = tmp_path / "pool.jsonl"
    f.write_text(json.dumps({"problem": "What is 2 + 2?"}) + "\n")
    with pytest.raises(SystemExit, match="--init_pool"):
        O.config_from_args(["--recipe", "paper", "--init_pool", str(f)])
    with pytest.raises(ValueError, match="--select_scope"):
        O.Config(select_scope="batch").validate()


# ------------------------------------------------------------------------------------------------
# real runs: two steps of each recipe on the tiny model
# ------------------------------------------------------------------------------------------------

def _rows(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("recipe", ["code", "paper"])
def test_tiny_two_step_run_of_each_recipe(tmp_path, recipe):
    out = str(tmp_path / recipe)
    O.main(["--model", "tiny", "--steps", "2", "--recipe", recipe, "--out", out, "--init_pool_size", "1",
            "--init_pool_max_rounds", "1"] if recipe == "code" else
           ["--model", "tiny", "--steps", "2", "--recipe", recipe, "--out", out])
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["recipe"] == recipe and all(saved[k] == v for k, v in O.RECIPES[recipe].items() if k != "warmup_steps")
    m, probs = _rows(os.path.join(out, "metrics.jsonl")), _rows(os.path.join(out, "problems.jsonl"))
    assert [r["step"] for r in m] == [1, 2] and all(r["recipe"] == recipe for r in m)
    assert any(r["train/student_adv_abs"] > 0 for r in m) and any(r["train/teacher_adv_abs"] > 0 for r in m)
    teach = [sum(p["trained_as_teacher"] for p in probs if p["step"] == s) for s in (1, 2)]
    stud = [sum(p["trained_as_student"] for p in probs if p["step"] == s) for s in (1, 2)]
    legal = [p for p in probs if p["legal"]]
    assert all(p["rewards"]["length"] == 0.0 for p in legal if p["n_parsed"] == 0)  # fix 2, in a real run
    assert not any(p["trained_as_student"] and p["n_parsed"] == 0 for p in probs)
    if recipe == "code":  # 2 rounds a step: one group of 8 and one problem per round
        assert teach == [16, 16] and all(1 <= n <= 2 for n in stud)
        assert [r["train/teacher_seqs"] for r in m] == [16, 16]
        assert os.path.exists(os.path.join(out, "init_pool.jsonl"))
    else:  # 8 reference groups a step: the top half (4 groups, 32 sequences) and 4 problems (32)
        assert teach == [32, 32] and stud == [4, 4]
        assert [(r["train/teacher_seqs"], r["train/student_seqs"]) for r in m] == [(32, 32), (32, 32)]
        assert not os.path.exists(os.path.join(out, "init_pool.jsonl"))  # no starting-pool growth
        assert m[0]["pool"] == 1 + sum(1 for p in legal if p["step"] == 1)  # from the seed problem alone
        assert all(0.0 <= p["rewards"]["diversity"] <= 2.0 for p in legal)
        assert all(p["rewards"]["format"] == 1.0 for p in legal)


# ------------------------------------------------------------------------------------------------
# eval.py: the later version's benchmarks
# ------------------------------------------------------------------------------------------------

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
