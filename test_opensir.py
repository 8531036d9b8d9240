"""Tests of opensir.py, in the order of its sections: config and its tables; prompts and parsing; rewards
(hand-computed oracles, the code and paper recipes of each equation side by side); sampling; scoring a
round; selection; advantages; log-probs and the loss; the pool; and real runs of the loop on models the
tests build themselves (no download)."""
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import opensir as O
from conftest import GOOD, HERE, NOT_COMPARED, make_tokenizer, params, rows, sample, tiny_path

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cfg(**kw):
    return O.Config(**kw)


def _cand(group, legal=True, answers=(), lengths=(), think=True, emb=None, combined=None):
    """A candidate as play_rounds leaves it (before scoring): parsed output, solutions, answers. With
    `combined`, a scored candidate with that ranking key."""
    text = GOOD if legal else "<problem>x</problem>"
    parsed = O.parse_teacher(text)
    parsed.has_think = think
    sols = [O.Completion([1], [5] * n, "Therefore, the final answer is: $\\boxed{1}$", False) for n in lengths]
    c = O.Candidate(group, O.Completion([1], [5, 2], text, False), parsed, sols, list(answers))
    c.embedding = emb
    if combined is not None:
        c.rank_key, c.n_parsed = combined, (8 if legal else 0)
    return c


# ------------------------------------------------------------------------------------------------
# config and its tables
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [
    (dict(band_lo=0.9, band_hi=0.5), "need band_lo <= band_hi, got 0.9, 0.5"),
    (dict(student_group=1), "--student_group must be >= 2, got 1"),
    (dict(teacher_group=0), "--teacher_group must be >= 2, got 0"),
    (dict(loss_agg="mean"), "--loss_agg must be one of token, sequence, role, constant, got 'mean'"),
    (dict(w_div=-1.0), "--w_div must be >= 0, got -1.0"),
    (dict(temperature=0.0), "--temperature must be > 0, got 0.0"),
    (dict(select_scope="batch"), "--select_scope must be one of round, step, got 'batch'"),
])
def test_config_rejects_bad_values_naming_the_flag(kw, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        O.Config(**kw).validate()


FLOATS = [f.name for f in dataclasses.fields(O.Config) if f.type == "float"]


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_field_must_be_finite(name, value):
    with pytest.raises(ValueError, match=f"--{name} must be a finite number"):
        O.Config(**{name: value}).validate()


def test_recipe_presets_cover_every_row_and_code_is_the_default():
    assert set(O.RECIPES) == {"code", "paper"}
    assert all(set(r) == set(O.RECIPE_FIELDS) for r in O.RECIPES.values())
    assert all(O.RECIPES["code"][k] != O.RECIPES["paper"][k] for k in O.RECIPE_FIELDS)  # every row differs
    assert all(getattr(O.Config(), k) == v for k, v in O.RECIPES["code"].items())


# ------------------------------------------------------------------------------------------------
# prompts and parsing
# ------------------------------------------------------------------------------------------------

def test_parse_teacher_legal_output():
    t = O.parse_teacher(GOOD)
    assert t.legal and t.has_think
    assert t.problem == "A square has side 3 cm. What is its area?"
    assert t.concepts == ["area of a square", "multiplication"]


@pytest.mark.parametrize("text, why", [
    ("<problem>What is 2+2?</problem>", "no concepts"),
    ("<problem>short</problem><concepts>multiplication</concepts>", "problem under 10 chars"),
    ("<problem>..........</problem><concepts>multiplication</concepts>", "only dots"),
    ("<problem>What is 12 + 30?</problem><concepts>add, sum</concepts>", "no concept of 10+ chars"),
    ("<problem>What is 12 + 30?</problem><concepts>addition, a, b, c</concepts>", "four concepts"),
    ("<problem>What is 12 + 30?</problem><concepts>addition of\nnumbers</concepts>", "two lines"),
    ("<problem>What is 12 + 30?</problem><concepts></concepts>", "empty concepts"),
    ("<problem>What is 12 + 30?<concepts>addition of numbers</concepts>", "unclosed problem"),
])
def test_parse_teacher_illegal(text, why):
    assert not O.parse_teacher(text).legal, why


def test_parse_teacher_without_think_is_legal_but_no_format_reward():
    t = O.parse_teacher("<problem>What is 12 + 30?</problem><concepts>addition of numbers</concepts>")
    assert t.legal and not t.has_think


def test_parse_teacher_reads_tags_in_any_case():
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
def test_concept_items_count_and_lines(concepts, legal):
    t = O.parse_teacher(f"<problem>A square has side 3 cm. What is its area?</problem><concepts>{concepts}</concepts>")
    assert t.legal is legal


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}} and later \\boxed{7}", "\\frac{1}{2}"),  # nested braces; the first box
    ("\\boxed{{a}+{b}}", "{a}+{b}"),
    ("no box here", None),
    ("\\boxed{unclosed {", None),
])
def test_extract_boxed(text, expected):
    assert O.extract_boxed(text) == expected


def test_final_line_format():
    assert O.has_final_line("step\nTherefore, the final answer is: $\\boxed{3}$")
    assert O.has_final_line("Therefore, the final answer is: $\\boxed{3}$.\n\n")
    assert not O.has_final_line("Therefore, the final answer is: $\\boxed{3}$\nmore text")
    assert not O.has_final_line("The answer is \\boxed{3}")


# ------------------------------------------------------------------------------------------------
# rewards: hand-computed oracles, the code and paper recipes of each equation side by side
# ------------------------------------------------------------------------------------------------

# Eq. 1, the solve rate: over the parsed answers (code) or over the whole group (paper)

def test_majority_vote_ties_and_unparsed():
    assert O.majority_vote(["2", None, "3", "3", "2", None]) == ("2", 0.5, 4)  # tie -> earliest sampled
    assert O.majority_vote(["3", None, "2", "3"]) == ("3", 2 / 3, 3)
    assert O.majority_vote([None] * 8) == (None, 0.0, 0)


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


# Eq. 2, the solvability tent: floor 1/#{k/G in band} (code) or 1/G (paper)

def test_tent_floor():
    assert O.tent_floor(8, 0.5, 0.9) == 0.25  # 4/8, 5/8, 6/8, 7/8
    assert O.tent_floor(4, 0.5, 0.9) == 0.5  # 2/4, 3/4
    assert O.tent_floor(10, 0.5, 0.9) == 0.2  # 5/10 .. 9/10


@pytest.mark.parametrize("s, expected", [
    (0.7, 1.0),  # peak at the middle of the band
    (0.5, 0.25), (0.9, 0.25),  # y_min at both edges
    (0.625, 1 - 0.75 * 0.075 / 0.2),  # 5/8: 0.71875
    (0.75, 1 - 0.75 * 0.05 / 0.2),  # 6/8: 0.8125
    (0.875, 1 - 0.75 * 0.175 / 0.2),  # 7/8: 0.34375
    (0.49, 0.0), (0.375, 0.0), (1.0, 0.0), (0.0, 0.0),  # outside the band
])
def test_solvability_reward(s, expected):
    assert O.solvability_reward(s, 8, 0.5, 0.9) == pytest.approx(expected)


@pytest.mark.parametrize("s, expected", [(4 / 8, 0.125), (5 / 8, 0.671875), (6 / 8, 0.78125), (7 / 8, 0.234375),
                                         (3 / 8, 0.0), (1.0, 0.0), (0.7, 1.0)])
def test_paper_tent_floor_one_over_g(s, expected):
    # eta = (1 - 1/8) / 0.2 = 4.375;  R = 1 - eta |s - 0.7|
    assert O.solvability_reward(s, 8, 0.5, 0.9, rule="group") == pytest.approx(expected)
    assert O.tent_floor(8, 0.5, 0.9, rule="group") == 0.125
    assert O.tent_floor(8, 0.5, 0.9, rule="band") == 0.25  # the code recipe's floor is unchanged


def test_solvability_with_fewer_parsed_answers():
    # 8 samples, 4 unparsed: 3 of the 4 parsed agree -> s = 0.75, y_min still from G = 8
    _, s, n = O.majority_vote(["5", "5", None, "5", "6", None, None, None])
    assert (s, n) == (0.75, 4)
    assert O.solvability_reward(s, 8, 0.5, 0.9) == pytest.approx(0.8125)


# Eq. 3, the solution length

def test_length_reward_cap():
    assert O.length_reward([100, 300], 1000) == pytest.approx(0.2)
    assert O.length_reward([500, 1500], 1000) == pytest.approx(1.0)
    assert O.length_reward([3000, 4000], 1000) == 1.0
    assert O.length_reward([], 1000) == 0.0


# Eq. 4, diversity: top-k cosine against pool and round (code) or nearest distance to the pool (paper)

def test_diversity_of_a_duplicate_and_top5_mean():
    eye = torch.eye(8)
    pool = eye[:6]  # orthonormal: cos(e0, pool) = 1, 0, 0, 0, 0, 0
    d = O.diversity_rewards(eye[:1], pool, topk=5, center=False)
    assert d.item() == pytest.approx((1 - (1 + 0 + 0 + 0 + 0) / 5) / 2)  # 0.4
    d1 = O.diversity_rewards(eye[:1], pool, topk=1, center=False)
    assert d1.item() == pytest.approx(0.0)  # an exact copy of a pool problem
    # the other candidates of the round count as neighbours too; a candidate is not its own
    two = torch.stack([eye[7], eye[7]])
    assert O.diversity_rewards(two, pool, topk=1, center=False).tolist() == pytest.approx([0.0, 0.0])
    # opposite vectors are maximally diverse
    assert O.diversity_rewards(-eye[:1], eye[:1], topk=5, center=False).item() == pytest.approx(1.0)


def test_diversity_scale_invariance_and_centering():
    # raw embeddings are mean-pooled hidden states: only directions matter
    g = torch.Generator().manual_seed(0)
    pool, cand = torch.randn(10, 16, generator=g), torch.randn(3, 16, generator=g)
    a = O.diversity_rewards(cand, pool, 5, center=False)
    assert torch.allclose(a, O.diversity_rewards(cand * 7.0, pool * 0.1, 5, center=False), atol=1e-6)
    # anisotropy: a shared offset makes every raw cosine ~1 (diversity ~0); centering removes it
    offset = torch.full((16,), 50.0)
    raw = O.diversity_rewards(cand + offset, pool + offset, 5, center=False)
    cen = O.diversity_rewards(cand + offset, pool + offset, 5, center=True)
    assert raw.max() < 0.01
    assert torch.allclose(cen, O.diversity_rewards(cand, pool, 5, center=True), atol=1e-5)
    assert cen.min() > 0.2


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


# formats: a <think> block and the final line (code), valid tags and any box (paper)

def test_format_rewards_of_each_recipe():
    assert O.teacher_format_reward(O.parse_teacher(GOOD), "think") == 1.0
    no_think = O.parse_teacher("<problem>What is 12 + 30?</problem><concepts>addition of numbers</concepts>")
    assert O.teacher_format_reward(no_think, "think") == 0.0
    assert O.teacher_format_reward(no_think, "tags") == 1.0  # valid tags are the paper's format
    boxed_mid = "The answer is \\boxed{3} as shown.\nDone."
    assert O.student_format_reward(boxed_mid, "final_line") == 0.0
    assert O.student_format_reward(boxed_mid, "boxed") == 1.0
    assert O.student_format_reward("The answer is 3.", "boxed") == 0.0


def test_teacher_and_student_reward_weights():
    cfg = _cfg()
    assert O.teacher_total(1.0, 0.5, 0.2, 1.0, cfg) == pytest.approx(1.0 + 0.5 + 0.2 + 0.1)
    assert O.teacher_total(1.0, 0.5, 0.2, 1.0, _cfg(w_div=0)) == pytest.approx(1.3)
    r = O.student_rewards(["4", "5", None], "4", [True, True, False], cfg)
    assert r == pytest.approx([1.1, 0.1, 0.0])


# ------------------------------------------------------------------------------------------------
# sampling: generate
# ------------------------------------------------------------------------------------------------

def test_cut_at_eos():
    assert O.cut_at_eos([5, 6, 2, 7, 2], [2]) == ([5, 6, 2], False)  # through the first EOS
    assert O.cut_at_eos([5, 2, 2, 2], [2]) == ([5, 2], False)  # pad == EOS: the EOS is kept
    assert O.cut_at_eos([5, 6, 7], [2]) == ([5, 6, 7], True)  # truncated: every token is real
    assert O.cut_at_eos([5, 9, 6], [2, 9]) == ([5, 9], False)  # any end-of-turn id


def test_generation_halves_its_batch_on_out_of_memory(small, monkeypatch, capsys):
    """Out-of-memory in generate must not kill the run: retry with half the batch, and say so."""
    model, tok = small
    real, sizes = model.generate, []

    def generate_with_a_memory_limit(**kw):  # the real generate, refusing batches above 3
        sizes.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(**kw)

    monkeypatch.setattr(model, "generate", generate_with_a_memory_limit)
    prompts = [O.chat(tok, O.student_prompt(f"What is {i}+1?")) for i in range(10)]
    outs = sample(model, tok, prompts, 4, 1.0, 50, 1.0, batch_size=16, desc="student")
    assert len(outs) == 10 and all(o is not None and 1 <= len(o.ids) <= 4 for o in outs)
    assert sizes[:3] == [10, 8, 4] and max(sizes[3:]) <= 2
    assert "out of memory: retrying with --gen_batch 2" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# scoring a round
# ------------------------------------------------------------------------------------------------

def test_score_candidates_pairs_length_with_its_own_problem():
    # the authors' code misaligned length rewards once a legal problem had no parsed answer
    cfg = _cfg(w_div=0)
    cands = [_cand(0, True, [None] * 8, [10] * 8), _cand(0, False),
             _cand(0, True, ["1"] * 6 + ["2"] * 2, [500] * 8)]
    O.score_candidates(cands, None, cfg)
    a, illegal, b = cands
    assert (a.solv, a.length, a.majority, a.scored) == (0.0, 0.0, None, False)  # no parsed answer: no length
    assert illegal.reward == 0.0 and illegal.rank_key == 0.0
    assert b.solve_rate == 0.75 and b.solv == pytest.approx(0.8125) and b.length == 0.5
    assert b.reward == pytest.approx(0.8125 + 0.5 + 0.1)
    assert b.student_rewards == pytest.approx([1.1] * 6 + [0.1] * 2)


def test_problem_with_no_parsed_answer_gets_no_length_and_is_never_selected():
    rambling = _cand(0, answers=[None] * 8, lengths=[2048] * 8)  # every solution ran to the budget, no box
    fine = _cand(1, answers=["3"] * 6 + ["4"] * 2, lengths=[20] * 8)
    emb = torch.eye(4)
    rambling.embedding, fine.embedding = emb[0], emb[1]
    cands = [rambling, fine]
    O.score_candidates(cands, emb[2:], _cfg(select_key="total"))
    assert rambling.length == 0.0 and not rambling.scored  # not the full length reward of 1.0
    assert rambling.reward == pytest.approx(rambling.div + 0.1)  # diversity and format only
    rambling.rank_key = fine.rank_key + 1.0  # even with the best ranking key...
    assert O.select_student_problem(cands) == 1  # ...it is out of both selections
    chosen = O.select_step([cands], 1, 1.0, 1.0)
    assert chosen == [([0, 1], [1])]  # its group is kept as a group (it ranks last), never as a problem


# ------------------------------------------------------------------------------------------------
# selection: per round (code) and per step (paper)
# ------------------------------------------------------------------------------------------------

def test_selection_highest_variance_group_and_best_student():
    combined = np.array([[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]], dtype=float)
    legal = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    assert O.select_teacher_group(combined, legal) == 1
    # all-illegal groups rank last even against a zero-variance legal group
    assert O.select_teacher_group(np.zeros((2, 4)), np.array([[0] * 4, [0, 1, 0, 0]], dtype=bool)) == 1
    cands = [_cand(0, True), _cand(0, False), _cand(1, True)]
    cands[0].rank_key, cands[1].rank_key, cands[2].rank_key = 0.5, 9.0, 0.7
    cands[0].n_parsed = cands[2].n_parsed = 8  # legal with parsed answers: they have a score
    assert O.select_student_problem(cands) == 2
    assert O.select_student_problem([_cand(0, False)]) is None


def test_group_variance_over_members_with_a_score():
    # group 0: two scored members of key 1 and two illegal ones. Over all four (illegal as 0) its
    # variance is 0.25; over its scored members it is 0, so group 1 (variance 0.02) wins.
    combined = np.array([[1.0, 1.0, 0.0, 0.0], [0.2, 0.6, 0.4, 0.4]])
    scored = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=bool)
    assert combined.var(axis=1)[0] > combined.var(axis=1)[1]  # a variance over all members would pick group 0
    assert O.select_teacher_group(combined, scored) == 1
    assert O.group_spread(combined, scored).tolist() == pytest.approx([0.0, 0.02])
    # a group with no scored member ranks last, even below a zero-variance one
    assert O.select_teacher_group(np.array([[0.0, 5.0], [1.0, 1.0]]), np.array([[0, 0], [1, 1]], dtype=bool)) == 1


def test_paper_ranks_by_the_full_teacher_score():
    # a has the larger solv + div, b the larger total (its solutions are long)
    a = _cand(0, answers=["1"] * 6 + ["2"] * 2, lengths=[10] * 8)
    b = _cand(0, answers=["1"] * 5 + ["2"] * 3, lengths=[1000] * 8)
    for key, winner in (("combined", 0), ("total", 1)):
        cands = [dataclasses.replace(a), dataclasses.replace(b)]
        O.score_candidates(cands, None, _cfg(w_div=0, select_key=key))
        assert O.select_student_problem(cands) == winner
    assert cands[1].rank_key == pytest.approx(cands[1].reward)


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
# advantages
# ------------------------------------------------------------------------------------------------

def test_group_advantages():
    a = O.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]]), 1e-4)
    std = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)  # unbiased: 0.5
    assert a[0].tolist() == pytest.approx([0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3)
    assert a[1].tolist() == [0.0] * 4  # zero variance: exactly 0, not NaN
    assert not torch.isnan(O.group_advantages(torch.zeros(1, 8), 1e-4)).any()


# ------------------------------------------------------------------------------------------------
# log-probs and the GRPO loss
# ------------------------------------------------------------------------------------------------

def test_grpo_token_loss_oracle():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    old = torch.tensor([-1.0, -2.5, -0.2])  # ratios 1, e^0.5 = 1.65 (clipped), e^-0.3 = 0.74 (clipped)
    ref = torch.tensor([-1.2, -2.0, -0.1])
    A, eps, beta = 2.0, 0.2, 0.1
    loss, kl = O.grpo_token_loss(logp, old, ref, A, eps, beta)
    for t in range(3):
        r = math.exp(logp[t] - old[t])
        surr = min(r * A, min(max(r, 1 - eps), 1 + eps) * A)
        d = float(ref[t] - logp[t])
        k3 = math.exp(d) - d - 1
        assert loss[t].item() == pytest.approx(-surr + beta * k3, rel=1e-5)
        assert kl[t].item() == pytest.approx(k3, rel=1e-5, abs=1e-7)
    # negative advantage: min picks the clipped side when the ratio is above 1 + eps
    neg, _ = O.grpo_token_loss(logp, old, None, -1.0, eps, 0.0)
    assert neg[1].item() == pytest.approx(math.exp(0.5) * 1.0)  # -min(-1.65, -1.2) = 1.65


def test_loss_weights_by_aggregation():
    def seq(n, role, masked=0):
        return O.TrainSeq([1], [5] * n, [1] * (n - masked) + [0] * masked, 0.0, role)
    rounds = [[seq(4, "teacher", masked=2), seq(6, "teacher"), seq(10, "student")], [seq(5, "teacher")]]
    O.set_loss_weights(rounds, "token", 100)
    assert [s.weight for s in rounds[0]] == pytest.approx([1 / 18 / 2] * 3)  # 2 + 6 + 10 tokens, 2 rounds
    assert rounds[1][0].weight == pytest.approx(1 / 5 / 2)
    O.set_loss_weights(rounds, "sequence", 100)
    assert [s.weight for s in rounds[0]] == pytest.approx([1 / (3 * 2) / 2, 1 / (3 * 6) / 2, 1 / (3 * 10) / 2])
    O.set_loss_weights(rounds, "role", 100)
    assert [s.weight for s in rounds[0]] == pytest.approx([1 / (2 * 8) / 2] * 2 + [1 / (2 * 10) / 2])
    O.set_loss_weights(rounds, "constant", 100)
    assert [s.weight for s in rounds[0]] == pytest.approx([1 / (3 * 100) / 2] * 3)


def test_concepts_mask_covers_exactly_the_span():
    tok = make_tokenizer()
    text = "<think>a</think>\n<problem>What is 7 times 8?</problem>\n<concepts>multiplication, facts</concepts>"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    mask = O.concepts_mask(tok, ids)
    masked = tok.decode([t for t, m in zip(ids, mask) if m == 0])
    kept = tok.decode([t for t, m in zip(ids, mask) if m == 1], skip_special_tokens=True)
    assert masked.strip() == "<concepts>multiplication, facts</concepts>"
    assert kept.startswith("<think>a</think>") and "</problem>" in kept and "concepts" not in kept
    assert mask[-1] == 1  # the EOS after the span still carries loss
    plain = tok("no tags here", add_special_tokens=False)["input_ids"]
    assert O.concepts_mask(tok, plain) == [1] * len(plain)


def _seqs(tok, n=3):
    out = []
    for i in range(n):
        p = tok(O.chat(tok, O.student_prompt(f"What is {i}+{i * 7}?")), add_special_tokens=False)["input_ids"]
        c = tok(f"It is {i * 8}. " * (i + 1), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(O.TrainSeq(p, c, [1] * len(c), float(i) - 1.0, "student"))
    return out


def test_sequence_logprobs_match_plain_forward_and_padding(small):
    model, tok = small
    seqs = _seqs(tok)
    T = 0.7
    batched = O.sequence_logprobs(model, seqs, T, chunk=5)  # chunking across sequence boundaries
    for s, lp in zip(seqs, batched):
        ids = torch.tensor([s.prompt_ids + s.ids])
        with torch.no_grad():
            logits = model(ids).logits[0] / T  # plain forward, no padding, full vocabulary
        ref = logits.log_softmax(-1)[len(s.prompt_ids) - 1: -1].gather(1, torch.tensor(s.ids)[:, None])[:, 0]
        assert torch.allclose(lp, ref, atol=1e-5)
        alone = O.sequence_logprobs(model, [s], T, chunk=1024)[0]
        assert torch.allclose(lp, alone, atol=1e-5)


def test_gemma2_softcapped_logprobs_match_plain_forward():
    """Gemma-2 squashes logits with tanh(x / 30) * 30; the chunked log-probs must include it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("gemma2", vocab_size=300, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=8, final_logit_softcapping=2.0, attn_logit_softcapping=5.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # large output weights so the cap really bites
        model.get_output_embeddings().weight.mul_(50)
    s = O.TrainSeq(list(range(3, 15)), list(range(20, 30)), [1] * 10, 1.0, "student")
    lp = O.sequence_logprobs(model, [s], 0.6, chunk=4)[0]
    with torch.no_grad():
        logits = model(torch.tensor([s.prompt_ids + s.ids])).logits[0] / 0.6  # HF applies the cap itself
    ref = logits.log_softmax(-1)[11:-1].gather(1, torch.tensor(s.ids)[:, None])[:, 0]
    assert torch.allclose(lp, ref, atol=1e-5)


@gpu
def test_gpu_chunked_logprobs_equal_plain():
    model, tok = O.load_model("gemma-2-2b-it", device="cuda", dtype="bf16", random_init=True)
    g = torch.Generator().manual_seed(0)
    seqs = [O.TrainSeq(torch.randint(10, 1000, (200,), generator=g).tolist(),
                       torch.randint(10, 1000, (n,), generator=g).tolist(), [1] * n, 1.0, "student")
            for n in (300, 50)]
    chunked = torch.cat(O.sequence_logprobs(model, seqs, 1.0, chunk=128))
    whole = torch.cat(O.sequence_logprobs(model, seqs, 1.0, chunk=10**9))
    assert torch.allclose(chunked, whole, atol=1e-3)


def _loss_and_grads(model, ref_model, rounds, cfg):
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return O.optimise(m, ref_model, opt, sched, rounds, cfg, None)


def _grad_vector(model, rounds, cfg):
    m = copy.deepcopy(model)
    O.set_loss_weights(rounds, cfg.loss_agg, 100)
    for mb in [sum(rounds, [])[i: i + cfg.train_micro_batch] for i in range(0, 4, cfg.train_micro_batch)]:
        loss = 0
        for s, lp in zip(mb, O.sequence_logprobs(m, mb, cfg.temperature, 1024)):
            l_t, _ = O.grpo_token_loss(lp, lp.detach(), None, s.advantage, 0.2, 0.0)
            loss = loss + s.weight * (l_t * torch.tensor(s.mask, dtype=l_t.dtype)).sum()
        loss.backward()
    return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])


def test_loss_equals_independent_per_token_computation_and_micro_batch_invariance(small):
    model, tok = small
    ref_model = copy.deepcopy(model)
    with torch.no_grad():  # a reference that differs, so the KL term is not zero
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seqs = _seqs(tok, 4)
    for s in seqs[:2]:
        s.role = "teacher"
    seqs[0].mask[1] = 0  # a masked token (as in the <concepts> span) carries no loss
    rounds = [seqs[:3], seqs[3:]]
    T, beta = 0.7, 0.1
    # independent: plain full forward per sequence at temperature T, a python loop over tokens,
    # token mean per round, mean over rounds; one update per rollout so the ratio is 1
    expected = 0.0
    for r in rounds:
        n_tok = sum(sum(s.mask) for s in r)
        total = 0.0
        for s in r:
            ids = torch.tensor([s.prompt_ids + s.ids])
            with torch.no_grad():
                lp = (model(ids).logits[0] / T).log_softmax(-1)
                lr = (ref_model(ids).logits[0] / T).log_softmax(-1)
            for j, t in enumerate(s.ids):
                if not s.mask[j]:
                    continue
                pos = len(s.prompt_ids) - 1 + j
                d = lr[pos, t].item() - lp[pos, t].item()
                total += -s.advantage + beta * (math.exp(d) - d - 1)
        expected += total / n_tok / len(rounds)
    cfg = O.Config(beta=beta, temperature=T, w_div=0.0, train_micro_batch=1, max_grad_norm=1e9)
    got1 = _loss_and_grads(model, ref_model, rounds, cfg)
    cfg4 = O.Config(beta=beta, temperature=T, w_div=0.0, train_micro_batch=4, max_grad_norm=1e9)
    got4 = _loss_and_grads(model, ref_model, rounds, cfg4)
    assert got1["kl"] > 1e-4
    assert got1["loss"] == pytest.approx(expected, rel=1e-5)
    assert got4["loss"] == pytest.approx(expected, rel=1e-5)
    g1 = _grad_vector(model, rounds, cfg)
    g4 = _grad_vector(model, rounds, cfg4)
    assert torch.allclose(g1, g4, atol=1e-6, rtol=1e-4)
    assert g1.abs().sum() > 0


def test_several_updates_per_rollout_use_the_rollout_log_probs(small):
    """With mu = 2 the second update's ratio is against the rollout's log-probs, so it leaves 1 and
    the clip engages; with mu = 1 the ratio is exactly 1 and nothing is clipped."""
    model, tok = small
    for mu, clipped in ((1, False), (2, True)):
        m = copy.deepcopy(model).float()
        opt = torch.optim.SGD(m.parameters(), lr=50.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        stats = O.optimise(m, None, opt, sched, [_seqs(tok)], O.Config(beta=0.0, updates_per_rollout=mu,
                                                                     max_grad_norm=1e9), None)
        assert (stats["clip_frac"] > 0) == clipped and math.isfinite(stats["loss"])


def test_default_lr_update_moves_fp32_master_weights(small):
    """At lr 3e-7 a bf16 weight cannot move (spacing ~0.4% of its value); fp32 master weights do."""
    model, tok = small
    m = copy.deepcopy(model).float()
    before = [p.detach().clone() for p in m.parameters()]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-7)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    O.optimise(m, None, opt, sched, [_seqs(tok)], O.Config(beta=0.0), None)
    moved = [(p.detach() - b).abs().max().item() for p, b in zip(m.parameters(), before)]
    assert max(moved) > 1e-7  # AdamW moves each weight by ~lr
    # the same update rounded to bf16 is lost on most weights
    w_before = before[1].bfloat16()
    w_after = list(m.parameters())[1].detach().bfloat16()
    assert (w_before == w_after).float().mean() > 0.9


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_update_direction_follows_the_advantage(small, advantage):
    """A positive advantage makes its sequence more likely, a negative one less likely."""
    model, tok = small
    m = copy.deepcopy(model).float()
    s = _seqs(tok, 1)[0]
    s.advantage = advantage
    with torch.no_grad():
        before = O.sequence_logprobs(m, [s], 1.0, 1024)[0].sum()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    O.optimise(m, None, opt, sched, [[s]], O.Config(beta=0.0), None)
    with torch.no_grad():
        after = O.sequence_logprobs(m, [s], 1.0, 1024)[0].sum()
    assert (after - before) * advantage > 0


# ------------------------------------------------------------------------------------------------
# the pool: embeddings and the starting pool
# ------------------------------------------------------------------------------------------------

def test_embedding_padding_invariance(small):
    model, tok = small
    a = O.embed_texts(model, tok, ["What is 2+2?"])
    b = O.embed_texts(model, tok, ["What is 2+2?", "A much longer problem about seven apples and pears."])
    assert a.shape == (1, 32) and torch.allclose(a[0], b[0], atol=1e-5)


def _pool_cand(problem, majority):
    text = f"<problem>{problem}</problem><concepts>arithmetic of sums</concepts>"
    c = O.Candidate(0, O.Completion([1], [2], text, False), O.parse_teacher(text))
    c.majority, c.solve_rate = majority, 0.75
    return c


@pytest.mark.parametrize("problem, majority, kept", [
    ("Two plus two equals 4. What is 1 + 3 in this case?", "4", False),
    ("Two plus two equals 4, so what is 1 + 3 in this case?", "4", False),
    ("Half of 1,000 apples are sold. How many apples are left over?", "500", True),
    ("A crate holds 1,000 apples. How many apples do 1 crates hold?", "1000", False),  # another spelling
    ("A recipe uses \\frac{1}{2} cup of flour per cake; how much for one cake?", "1/2", False),
    ("A bottle holds 0.5 litres of juice; what fraction of a litre is that?", "1/2", False),
    ("A rope is 4.5 metres long and is cut in half. How long is each piece?", "4", True),  # 4.5 is not 4
    ("What is 14 + 2 when you add them together and subtract 12?", "4", True),  # 14 holds no 4
    ("What is the sum of all integers from one to four inclusive?", "10", True),
])
def test_starting_pool_rejects_a_problem_that_states_its_answer(problem, majority, kept):
    assert O.starting_pool_filter(_pool_cand(problem, majority), _cfg()) is kept


# ------------------------------------------------------------------------------------------------
# the loop: real runs
# ------------------------------------------------------------------------------------------------

FAST = ["--rounds_per_step", "1", "--n_refs", "2", "--teacher_group", "4", "--student_group", "4",
        "--teacher_max_new_tokens", "24", "--student_max_new_tokens", "16", "--init_pool_size", "0",
        "--warmup_steps", "0", "--lr", "1e-3"]
TINY_FAST = ["--rounds_per_step", "2", "--init_pool_size", "2", "--init_pool_max_rounds", "2"]


def test_round_with_no_legal_problem_does_not_crash(small_dir, tmp_path):
    # a random model writes no legal problem: the run must log it and go on
    out = str(tmp_path / "run")
    O.main(["--model", small_dir, "--out", out, "--steps", "2", *FAST])
    m = rows(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in m] == [1, 2]
    assert all(r["rounds/no_legal"] == 1 and r["train/student_seqs"] == 0 for r in m)
    assert all(not math.isnan(r["loss"]) for r in m)
    assert os.path.exists(os.path.join(out, "ckpt-00002", "state.pt"))


def test_tiny_two_step_run(tmp_path):
    """`--model tiny --steps 2`: real rounds with legal problems and votes, parameters change, the
    checkpoint loads with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = str(tmp_path / "run")
    O.main(["--model", "tiny", "--steps", "2", "--out", out])
    m = rows(os.path.join(out, "metrics.jsonl"))
    probs = rows(os.path.join(out, "problems.jsonl"))
    assert [r["step"] for r in m] == [1, 2]
    assert any(p["legal"] and p["majority"] is not None for p in probs)
    assert any(r["train/student_seqs"] > 0 and r["train/student_adv_abs"] > 0 for r in m)
    assert any(r["train/teacher_adv_abs"] > 0 for r in m)
    assert all(r["pool"] > 1 for r in m) and m[1]["pool"] >= m[0]["pool"]
    assert os.path.exists(os.path.join(out, "init_pool.jsonl"))
    ckpt = os.path.join(out, "ckpt-00002")
    assert os.path.exists(os.path.join(ckpt, "optimizer.pt"))  # only the newest keeps optimizer state
    assert not os.path.exists(os.path.join(out, "ckpt-00001", "optimizer.pt"))
    assert os.path.exists(os.path.join(out, "ckpt-00001", "model.safetensors"))
    before, after = params(tiny_path()), params(ckpt)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    AutoModelForCausalLM.from_pretrained(ckpt)
    AutoTokenizer.from_pretrained(ckpt)


def test_tiny_run_without_diversity(tmp_path):
    """Every reward weight may be 0: no embeddings are computed and no reference model is needed."""
    out = str(tmp_path / "run")
    O.main(["--model", "tiny", "--steps", "1", "--out", out, "--w_div", "0", "--beta", "0", *TINY_FAST])
    probs = rows(os.path.join(out, "problems.jsonl"))
    assert probs and all(p["rewards"]["diversity"] == 0.0 for p in probs)
    assert any(p["legal"] for p in probs)


@pytest.mark.parametrize("recipe", ["code", "paper"])
def test_tiny_two_step_run_of_each_recipe(tmp_path, recipe):
    out = str(tmp_path / recipe)
    O.main(["--model", "tiny", "--steps", "2", "--recipe", recipe, "--out", out, "--init_pool_size", "1",
            "--init_pool_max_rounds", "1"] if recipe == "code" else
           ["--model", "tiny", "--steps", "2", "--recipe", recipe, "--out", out])
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["recipe"] == recipe and all(saved[k] == v for k, v in O.RECIPES[recipe].items() if k != "warmup_steps")
    m, probs = rows(os.path.join(out, "metrics.jsonl")), rows(os.path.join(out, "problems.jsonl"))
    assert [r["step"] for r in m] == [1, 2] and all(r["recipe"] == recipe for r in m)
    assert any(r["train/student_adv_abs"] > 0 for r in m) and any(r["train/teacher_adv_abs"] > 0 for r in m)
    teach = [sum(p["trained_as_teacher"] for p in probs if p["step"] == s) for s in (1, 2)]
    stud = [sum(p["trained_as_student"] for p in probs if p["step"] == s) for s in (1, 2)]
    legal = [p for p in probs if p["legal"]]
    assert all(p["rewards"]["length"] == 0.0 for p in legal if p["n_parsed"] == 0)  # no parsed answer: no length
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


def test_tiny_bf16_path_keeps_fp32_master_weights(tmp_path):
    """--dtype bf16 runs the GPU code path on CPU: bf16 autocast over fp32 master weights, a bf16
    sampler copy refreshed after each update, a bf16 frozen model. Checkpoints hold the fp32 weights."""
    from safetensors.torch import load_file
    out = str(tmp_path / "run")
    O.main(["--model", "tiny", "--steps", "1", "--dtype", "bf16", "--out", out, *TINY_FAST])
    m = rows(os.path.join(out, "metrics.jsonl"))[0]
    assert m["train/teacher_seqs"] > 0 and math.isfinite(m["loss"])
    weights = load_file(os.path.join(out, "ckpt-00001", "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())
    before = load_file(os.path.join(tiny_path(), "model.safetensors"))
    assert any(not torch.equal(before[k], weights[k]) for k in before)


SAME_BYTES = {
    "code": {
        "problems.jsonl": "42947aa5f8dfa75f271bae2ec3cbaeaeca11e469f9035b82b738aebcdfb709c2",
        "metrics.jsonl": "7add071bef6a52ea5d973ebb8fd68924c4dfb5b32c814490be3cbfa8332b81b6",
        "ckpt-00001/model.safetensors": "d7162375e4bf4928f86f3a131fa7449d9e948c1faf6e6d494c0b826dfa66b321",
        "ckpt-00002/model.safetensors": "ebc49feb6c69d63675854776559b90288a37b1d12d143570d5ce1533480b0f35",
    },
    "paper": {
        "problems.jsonl": "2e9073df1ac3c56f70486d63d5b0642ee19fb1e6adf0cbdc4df79b5c5706bab0",
        "metrics.jsonl": "52ca428842118fa481b5803c5fcb05fafce9eaf43f01243415bc08349bb776f3",
        "ckpt-00001/model.safetensors": "db2b9d9febd51cba5073f70490cdce4b823fb032035f2d7f4458cdb3fa62b8cb",
        "ckpt-00002/model.safetensors": "32a9597b153224ca942c5325c9a59f441adff4a1a9fad4544cb53df266b386e6",
    },
}


def run_digests(out: str) -> dict:
    """sha256 of problems.jsonl, of metrics.jsonl without its timing keys (one sorted-key JSON object a
    line), and of each checkpoint's model.safetensors."""
    h = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    with open(os.path.join(out, "problems.jsonl"), "rb") as f:
        got = {"problems.jsonl": h(f.read())}
    got["metrics.jsonl"] = h("".join(json.dumps({k: v for k, v in r.items() if not k.startswith(NOT_COMPARED)},
                                                sort_keys=True) + "\n" for r in rows(os.path.join(out, "metrics.jsonl"))).encode())
    for c in sorted(d for d in os.listdir(out) if re.fullmatch(r"ckpt-\d{5}", d)):
        with open(os.path.join(out, c, "model.safetensors"), "rb") as f:
            got[f"{c}/model.safetensors"] = h(f.read())
    return got


@pytest.mark.parametrize("recipe", sorted(SAME_BYTES))
def test_two_step_tiny_run_gives_the_same_bytes(tmp_path, recipe):
    """A 2-step tiny run (`--engine generate`, seed 3) writes exactly the rollouts, metrics and weights
    recorded in SAME_BYTES: a refactor must not change a single byte of what a run produces. A commit
    that changes results on purpose updates these constants in the same commit (run this test and copy
    the digests it reports)."""
    out = str(tmp_path / recipe)
    proc = subprocess.run([sys.executable, "opensir.py", "--model", "tiny", "--steps", "2", "--save_every", "1",
                           "--seed", "3", "--engine", "generate", "--recipe", recipe, "--out", out],
                          cwd=HERE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert run_digests(out) == SAME_BYTES[recipe]


@gpu
def test_gpu_default_round_fits_in_70_gib(tmp_path):
    """One full round of the paper's recipe for gemma-2-2b-it (random weights, full-length outputs)."""
    torch.cuda.reset_peak_memory_stats()
    O.main(["--model", "gemma-2-2b-it", "--random_init", "--init_pool_size", "0", "--rounds_per_step", "1",
            "--steps", "1", "--out", str(tmp_path / "run")])
    m = rows(str(tmp_path / "run" / "metrics.jsonl"))[0]
    assert m["peak_mem_gib"] < 70, m
