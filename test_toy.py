"""Tests of the toy world (`--model toy`, tiny.py) and of demo.py's three modes on a few steps.
The model here is built with a few-second recipe in a temporary cache: plumbing, not learning."""
import json
import os
import random

import pytest

import opensir as O
import tiny as T


@pytest.fixture
def quick_toy(monkeypatch, tmp_path):
    """A few-second toy recipe, cached under a temporary OPENSIR_CACHE."""
    monkeypatch.setitem(T.TOY_TRAIN, "examples", 300)
    monkeypatch.setitem(T.TOY_TRAIN, "steps", 3)
    monkeypatch.setenv("OPENSIR_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_ladder_answers_rungs_and_concepts():
    rng = random.Random(0)
    for rung in range(len(T.TOY_RUNGS)):
        for _ in range(50):
            text, steps, ans = T.toy_problem(rng, rung)
            assert T.toy_rung(text) == rung and T.toy_answer(text) == ans
            assert len(steps) == [1, 1, 2, 2, 3][rung] and steps[-1].endswith(f"= {ans}.")
            assert eval(text[len("What is "):-1]) == ans  # the template's own arithmetic
    assert T.toy_rung("What is 1+1?") is None and T.toy_rung(None) is None and T.toy_answer("hello") is None
    for main, second in T.TOY_RUNGS:  # a legal concepts line: one item of 10+ characters
        assert O.parse_teacher(f"<problem>What is 2 + 3?</problem>\n<concepts>{main}, {second}</concepts>").legal


def test_slips_are_off_by_one_to_nine_and_carried_forward():
    """A slipped step's result is wrong by 1 to 9, later steps compute from it, the answer is the chain's
    last result; with p = 0 the chain is the true worked solution, and at TOY_SLIP about that share of
    steps slip."""
    rng = random.Random(0)
    slipped = total = 0
    for rung in range(len(T.TOY_RUNGS)):
        for _ in range(200):
            text, steps, ans = T.toy_problem(rng, rung)
            assert T._slipped(text, rung, rng, p=0.0) == (steps, ans)
            bad, bad_ans = T._slipped(text, rung, rng, p=1.0)
            assert len(bad) == len(steps)
            prev = None
            for line in bad:
                a, op, b, _, r = line[:-1].split()
                true = int(a) + int(b) if op == "+" else int(a) * int(b)
                assert 1 <= abs(int(r) - true) <= 9 and int(r) >= 0
                assert prev is None or prev in (int(a), int(b))  # computed from the slipped value
                prev = int(r)
            assert bad_ans == prev
            for line in T._slipped(text, rung, rng)[0]:  # a step slipped if its own arithmetic is wrong
                a, op, b, _, r = line[:-1].split()
                slipped += int(r) != (int(a) + int(b) if op == "+" else int(a) * int(b))
                total += 1
    assert abs(slipped / total - T.TOY_SLIP) < 0.05


def test_splits_are_fixed_and_held_out_never_drawn_for_training():
    held = T.toy_problem_set("heldout", 24, seed=0)
    dev = T.toy_problem_set("dev", 24, seed=0)
    assert held == T.toy_problem_set("heldout", 24, seed=0)  # deterministic
    assert len({t for t, _, _ in held}) == len(held) and {r for _, _, r in held} == set(range(5))
    assert all(T.toy_split(t) == "heldout" for t, _, _ in held) and all(T.toy_split(t) == "dev" for t, _, _ in dev)
    assert not {t for t, _, _ in held} & {t for t, _, _ in dev}
    # every problem text the builder trains on (references, teacher problems, student problems)
    rng = random.Random(1)
    seen = set()
    for _ in range(3000):
        for user, completion in T._toy_examples(rng):
            for text in (O._tag(completion, "problem"), user.split("Problem: ")[-1] if "Problem: " in user else None,
                         user.split("\n\n")[1] if user.startswith("Here is") else None):
                if text and text != "What is 1+1?":
                    seen.add(text)
    assert len(seen) > 1000 and all(T.toy_split(t) == "train" for t in seen)
    assert not seen & {t for t, _, _ in held + dev}
    # the training draws of demo.py: train split only
    rng = random.Random("demo-trainer-1")
    assert all(T.toy_split(T.toy_draw(rng)[0]) == "train" for _ in range(500))
    assert all(T.toy_split(t) == "train" for t, _, _ in T.toy_problem_set("train", 24, seed=0))


def test_toy_build_is_deterministic_and_cached(quick_toy, monkeypatch):
    a, b, c = (str(quick_toy / d) for d in "abc")
    T.build_toy_model(a, seed=3)
    T.build_toy_model(b, seed=3)
    T.build_toy_model(c, seed=4)
    read = lambda d, f: open(os.path.join(d, f), "rb").read()  # noqa: E731
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert read(a, f) == read(b, f), f
    assert read(a, "model.safetensors") != read(c, "model.safetensors")
    assert json.load(open(os.path.join(a, "config.json")))["num_hidden_layers"] == T.TOY_ARCH["num_hidden_layers"]
    path = T.ensure_toy_model(seed=3)
    assert path == T.toy_model_path(3) and f"toy-v{T.TOY_VERSION}" in path and path != T.tiny_model_path(3)
    calls = []
    monkeypatch.setattr(T, "build_toy_model", lambda p, seed=0: calls.append(p))
    assert T.ensure_toy_model(seed=3) == path and calls == []  # cached: no rebuild
    assert O.resolve_model("toy") == T.toy_model_path(0) and O.model_name_error("toy") is None
    cfg = O.config_from_args(["--model", "toy", "--lr", "5e-5"])
    assert cfg.lr == 5e-5 and cfg.rounds_per_step == O.TOY_DEFAULTS["rounds_per_step"]


def test_demo_modes_run_a_few_steps(quick_toy):
    import demo
    common = ["--seeds", "1", "--steps", "2", "--eval_every", "1", "--eval_per_rung", "1", "--eval_samples", "2",
              "--max_new_tokens", "16"]
    for mode, sampling in (("trainer", "T1.0"), ("majority", "T0.6")):
        out = str(quick_toy / mode)
        res = demo.main([mode, "--out", out, "--problems_per_step", "2", "--group", "2", "--fixed_per_rung", "2",
                         "--rungs", "2", "3", "--min_agreement", "0.9", "--sampling", sampling, *common])
        rows = res["variants"][mode]["rows"]
        assert {(r["setting"], r["metric"]) for r in rows} == {(s, m) for s in demo.SETTINGS for m in ("mean", "maj")}
        assert sorted({r["step"] for r in rows}) == [0, 1, 2]
        assert all(r["diff"][0][0] == 0.0 for r in rows if r["step"] == 0)
        train = [json.loads(line) for line in open(os.path.join(out, "seed1", "train.jsonl"))]
        assert [t["step"] for t in train] == [1, 2] and all(0 <= t["train_true_acc"] <= 1 for t in train)
        assert all(set(t["rungs"]) <= {2, 3} and len(t["agreement"]) == 2 for t in train)  # --rungs 2 3
        assert all(t["temperature"] == demo.SETTINGS[sampling][0] for t in train)
        # (b) skips exactly the groups whose majority holds under 0.9 of their answers; (a) skips none
        want = [sum(a < 0.9 for a in t["agreement"]) if mode == "majority" else 0 for t in train]
        assert [t["skipped_groups"] for t in train] == want
        assert os.path.exists(os.path.join(out, "results.md"))
        assert len(res["problems"]) == 5 and all(T.toy_split(t) == "heldout" for t, _, _ in res["problems"])
    out = str(quick_toy / "opensir")
    res = demo.main(["opensir", "--out", out, "--rounds_per_step", "1", "--stages", "2", *common,
                     "--opensir_args", "--band_lo 0.4 --band_hi 0.8"])
    assert set(res["variants"]) == {"full", "frozen_teacher"}
    for variant, teacher_seqs in (("full", O.Config.teacher_group), ("frozen_teacher", 0)):
        metrics = [json.loads(line) for line in open(os.path.join(out, f"{variant}-seed1", "metrics.jsonl"))]
        assert [m["train/teacher_seqs"] for m in metrics] == [teacher_seqs] * 2
        rows = [json.loads(line) for line in open(os.path.join(out, f"{variant}-seed1", "problems.jsonl"))]
        assert any(r["trained_as_teacher"] for r in rows) == (teacher_seqs > 0)  # the log says what was trained
        shift = res["variants"][variant]["rung_shift"]["1"]
        assert shift and all(abs(sum(s["rung_share"].values()) - 1) < 1e-9 for s in shift if s["legal"])
    cfg = json.load(open(os.path.join(out, "frozen_teacher-seed1", "config.json")))
    assert cfg["train_teacher"] is False and (cfg["band_lo"], cfg["band_hi"]) == (0.4, 0.8)  # --opensir_args
