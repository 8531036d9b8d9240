"""Tests of tiny.py: the built-in tiny model (`--model tiny`: tokenizer, cache, determinism, and that
sampling from it at the loop's settings gives legal problems, parsed answers and spread solve rates) and
the toy world (`--model toy`: the ladder, slips, splits, the build), with demo.py's three modes on a few
steps. Builds here use a few-second recipe in a temporary cache: plumbing, not learning."""
import json
import os
import random
import re
from collections import Counter

import pytest
import torch

import models
import opensir as O
import tiny as T

# ten problems in the tiny model's templates (those its builder drew first for seeds 0 to 9)
TINY_PROBLEMS = ["What is the remainder when 16 is divided by 2?", "What is the remainder when 27 is divided by 6?",
                 "What is 2 + 3 * 3?", "What is 70% of 40?", "What is the remainder when 15 is divided by 3?",
                 "What is 6 + 7?", "What is 9 * 6?", "What is 7 - 4?", "What is 5 + 7?", "What is 9 + 7?"]


# ------------------------------------------------------------------------------------------------
# the tiny model
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def quick_recipe(monkeypatch):
    """A few-second recipe for tests of the build's plumbing (not of what the model learns)."""
    monkeypatch.setitem(T.TINY_TRAIN, "examples", 300)
    monkeypatch.setitem(T.TINY_TRAIN, "steps", 3)


def _sample(model, tok, users, max_new_tokens, seed):
    """Like the loop: chat template, left padding, temperature 1.0, top-k 50, top-p 1.0."""
    tok.padding_side = "left"
    enc = tok([O.chat(tok, u) for u in users], return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.6M model gains nothing from more, and a shared CPU can stall a team
    try:
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=50, top_p=1.0,
                                 max_new_tokens=max_new_tokens)
    finally:
        torch.set_num_threads(threads)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_tokenizer_round_trips_and_chat_template(tiny):
    model, tok = tiny
    for text in ["What is 1+1?", "héllo ∫ $\\frac{1}{2}$ 日本 \\boxed{x^2}", "  two  spaces\n\ttab",
                 "<think>a</think>\n<problem>b</problem>\n<concepts>c</concepts>", "12345678901234567890"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    prompt = O.chat(tok, "Hi")
    assert prompt == "<|bos|><|user|>\nHi<|eot|>\n<|assistant|>\n"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.eos_token == "<|eot|>" and len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    for tag in T.TINY_TAGS:  # whole tokens, and decoding without special tokens keeps them
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1
        assert tok.decode(tok(tag)["input_ids"], skip_special_tokens=True) == tag
    gc = model.generation_config
    assert (gc.eos_token_id, gc.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def test_teacher_outputs_mostly_legal(tiny):
    model, tok = tiny
    first = _sample(model, tok, [O.teacher_prompt("What is 1+1?")] * 8, 64, seed=0)
    own = [p.problem for p in map(O.parse_teacher, first) if p.legal][:3]
    assert own, first
    outs = first + _sample(model, tok, [O.teacher_prompt(p) for p in own for _ in range(8)], 64, seed=1)
    parsed = [O.parse_teacher(o) for o in outs]
    legal = sum(p.legal for p in parsed) / len(parsed)
    assert 0.5 <= legal, (legal, outs)
    assert sum(p.has_think for p in parsed) > len(parsed) // 2
    assert len({p.problem for p in parsed if p.legal}) > len(parsed) // 4  # new problems, not one copy


def test_student_answers_parse_and_votes_spread(tiny):
    model, tok = tiny
    problems = TINY_PROBLEMS
    sols = _sample(model, tok, [O.student_prompt(p) for p in problems for _ in range(8)], 48, seed=2)
    answers = [O.normalize_answer(O.extract_boxed(s)) for s in sols]
    assert sum(a is not None for a in answers) >= 0.7 * len(answers), sols
    assert sum(O.has_final_line(s) for s in sols) >= 0.7 * len(sols)
    rates = []
    for i in range(len(problems)):
        got = [a for a in answers[8 * i: 8 * i + 8] if a is not None]
        rates.append(Counter(got).most_common(1)[0][1] / len(got) if got else 0.0)
    assert sum(r < 1.0 for r in rates) >= 2, rates  # imperfect arithmetic: groups with variance
    assert sum(0.5 <= r <= 0.9 for r in rates) >= 2, rates  # some problems land in the solvability band
    assert max(rates) >= 0.75, rates  # and some votes are confident


def test_build_is_deterministic_and_leaves_global_state(tmp_path, quick_recipe):
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    py = random.getstate()
    T.build_tiny_model(str(tmp_path / "a"), O.PROMPTS, seed=3)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    assert random.getstate() == py
    T.build_tiny_model(str(tmp_path / "b"), O.PROMPTS, seed=3)
    T.build_tiny_model(str(tmp_path / "c"), O.PROMPTS, seed=4)
    read = lambda d, f: (tmp_path / d / f).read_bytes()  # noqa: E731
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert read("a", f) == read("b", f), f
    assert read("a", "model.safetensors") != read("c", "model.safetensors")


def test_ensure_tiny_model_caches_and_never_leaves_half_builds(tmp_path, monkeypatch):
    root = str(tmp_path)
    path = T.tiny_model_path(root, seed=5)
    assert path.startswith(root) and f"v{T.TINY_VERSION}" in os.path.basename(path)
    monkeypatch.setenv("OPENSIR_CACHE", root)
    assert models.cache_root() == root  # where opensir.py's loading puts it
    calls = []

    def broken(p, prompts, seed=0):
        calls.append(p)
        open(os.path.join(p, "config.json"), "w").close()  # half-written, then it crashes
        raise RuntimeError("crash mid-build")

    monkeypatch.setattr(T, "build_tiny_model", broken)
    with pytest.raises(RuntimeError):
        T.ensure_tiny_model(O.PROMPTS, root, seed=5)
    assert not os.path.exists(path) and os.listdir(tmp_path) == []  # no half build, no temp dir left

    def fake(p, prompts, seed=0):
        assert prompts is O.PROMPTS  # built on the caller's prompts
        calls.append(p)
        with open(os.path.join(p, "config.json"), "w") as f:
            f.write(str(seed))

    monkeypatch.setattr(T, "build_tiny_model", fake)
    assert T.ensure_tiny_model(O.PROMPTS, root, seed=5) == path and open(os.path.join(path, "config.json")).read() == "5"
    assert T.ensure_tiny_model(O.PROMPTS, root, seed=5) == path and len(calls) == 2  # second call: cached, no rebuild
    assert os.listdir(tmp_path) == [os.path.basename(path)]


# ------------------------------------------------------------------------------------------------
# the toy world and demo.py
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_corpus(tmp_path_factory):
    """What the toy builder trains on, seen through its public inputs: prompt functions that record the
    reference (teacher) and the problem (student) they are given, and the tokenizer trainer's corpus
    (the first 2000 chat-formatted pairs, completions included). A few-second recipe."""
    import tokenizers
    refs, problems, corpus = set(), set(), []
    real_train = tokenizers.Tokenizer.train_from_iterator

    def recording_train(self, iterator, *args, **kwargs):
        texts = list(iterator)
        corpus.extend(texts)
        return real_train(self, texts, *args, **kwargs)

    prompts = (lambda ref: refs.add(ref) or f"TEACHER:{ref}", lambda text: problems.add(text) or f"STUDENT:{text}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(T.TOY_TRAIN, "examples", 3000)
        mp.setitem(T.TOY_TRAIN, "steps", 1)
        mp.setattr(tokenizers.Tokenizer, "train_from_iterator", recording_train)
        T.build_toy_model(str(tmp_path_factory.mktemp("toy")), prompts, seed=1)
    pairs = [re.fullmatch(r"(?s)<\|bos\|><\|user\|>\n(.*?)<\|eot\|>\n<\|assistant\|>\n(.*)<\|eot\|>\n", t).groups()
             for t in corpus]
    return {"refs": refs, "problems": problems, "pairs": pairs}


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


def _step(line):
    a, op, b, _, r = line[:-1].split()
    return int(a), op, int(b), int(r), (int(a) + int(b) if op == "+" else int(a) * int(b))


def test_worked_solutions_take_several_paths_with_weak_facts_and_slips(toy_corpus):
    """In the worked solutions the builder trains on: every solution is a path of its problem (each step
    joins the previous result, or two operands at first, with an operand not yet used; rung 3 adds before
    it multiplies); a step's result is right, or for a weak fact its fixed misconception, or off by 1 to 9
    (never below 0); later steps compute from it; the answer is the chain's last result. Weak facts are
    taught with their misconception more often than right (so the mode is wrong), strong facts slip about
    TOY_SLIP of the time, and the problem's left-to-right order is the most common path."""
    weak, strong, first = Counter(), Counter(), Counter()
    students = [(p, c) for p, c in toy_corpus["pairs"] if p.startswith("STUDENT:")]
    assert len(students) >= 900
    for user, completion in students:
        text = user[len("STUDENT:"):]
        rung = T.toy_rung(text)
        lines = completion.split("\n")
        steps, final = lines[:-1], lines[-1]
        assert rung is not None and len(steps) == [1, 1, 2, 2, 3][rung]
        left = [int(x) for x in re.findall(r"\d+", text)]
        prev = None
        for k, line in enumerate(steps):
            a, op, b, r, true = _step(line)
            assert op == ("*" if rung == 1 or (rung == 3 and k == 1) else "+")
            if k == 0:
                for x in (a, b):
                    left.remove(x)  # two of the problem's operands
            else:  # the previous (perhaps wrong) result and one operand not used yet, either way round
                assert prev in (a, b)
                left.remove(b if a == prev else a)
            kind = "right" if r == true else "mis" if T.toy_weak(a, op, b) and r == T.toy_misconception(a, op, b) else "slip"
            assert kind != "slip" or (1 <= abs(r - true) <= 9 and r >= 0)
            (weak if T.toy_weak(a, op, b) else strong)[kind] += 1
            prev = r
        assert not left  # every operand used once
        assert final == f"Therefore, the final answer is: $\\boxed{{{prev}}}$"
        first[steps[0].split(" =")[0] == " ".join(text[len("What is "):-1].replace("(", "").replace(")", "").split()[:3])] += 1
    assert weak["mis"] > weak["right"] > 0 and abs(sum(weak.values()) / (sum(weak.values()) + sum(strong.values()))
                                                   - T.TOY_WEAK) < 0.1
    assert abs(strong["slip"] / sum(strong.values()) - T.TOY_SLIP) < 0.02 and strong["mis"] == 0
    assert first[True] > first[False]  # the written order leads: greedy's path


def test_splits_are_fixed_and_held_out_never_drawn_for_training(toy_corpus):
    held = T.toy_problem_set("heldout", 24, seed=0)
    dev = T.toy_problem_set("dev", 24, seed=0)
    assert held == T.toy_problem_set("heldout", 24, seed=0)  # deterministic
    assert len({t for t, _, _ in held}) == len(held) and {r for _, _, r in held} == set(range(5))
    assert all(T.toy_split(t) == "heldout" for t, _, _ in held) and all(T.toy_split(t) == "dev" for t, _, _ in dev)
    assert not {t for t, _, _ in held} & {t for t, _, _ in dev}
    # every problem text the builder trains on (references, teacher problems, student problems)
    seen = {t for t in toy_corpus["refs"] | toy_corpus["problems"] if t != "What is 1+1?"}
    assert len(seen) > 1000 and all(T.toy_split(t) == "train" for t in seen)
    assert not seen & {t for t, _, _ in held + dev}
    # the training draws of demo.py: train split only
    rng = random.Random("demo-trainer-1")
    assert all(T.toy_split(T.toy_draw(rng)[0]) == "train" for _ in range(500))
    assert all(T.toy_split(t) == "train" for t, _, _ in T.toy_problem_set("train", 24, seed=0))


def test_toy_build_is_deterministic_and_cached(quick_toy, monkeypatch):
    a, b, c = (str(quick_toy / d) for d in "abc")
    T.build_toy_model(a, O.PROMPTS, seed=3)
    T.build_toy_model(b, O.PROMPTS, seed=3)
    T.build_toy_model(c, O.PROMPTS, seed=4)
    read = lambda d, f: open(os.path.join(d, f), "rb").read()  # noqa: E731
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert read(a, f) == read(b, f), f
    assert read(a, "model.safetensors") != read(c, "model.safetensors")
    assert json.load(open(os.path.join(a, "config.json")))["num_hidden_layers"] == T.TOY_ARCH["num_hidden_layers"]
    root = models.cache_root()
    path = T.ensure_toy_model(O.PROMPTS, root, seed=3)
    assert path == T.toy_model_path(root, 3) and f"toy-v{T.TOY_VERSION}" in path and path != T.tiny_model_path(root, 3)
    calls = []
    monkeypatch.setattr(T, "build_toy_model", lambda p, prompts, seed=0: calls.append(p))
    assert T.ensure_toy_model(O.PROMPTS, root, seed=3) == path and calls == []  # cached: no rebuild
    assert models.resolve_model("toy", O.PROMPTS) == T.toy_model_path(root, 0) and models.model_name_error("toy") is None
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
        assert {(r["setting"], r["metric"]) for r in rows} == {(s, m) for s in demo.SETTINGS for m in ("mean", "maj")} | {
            ("greedy", "mean")}
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
    assert [(r["setting"], r["metric"], r["step"]) for r in res["full_minus_frozen"]] == [(s, m, 2) for s, m in demo.METRICS]
    for variant, teacher_seqs in (("full", O.Config.teacher_group), ("frozen_teacher", 0)):
        metrics = [json.loads(line) for line in open(os.path.join(out, f"{variant}-seed1", "metrics.jsonl"))]
        assert [m["train/teacher_seqs"] for m in metrics] == [teacher_seqs] * 2
        rows = [json.loads(line) for line in open(os.path.join(out, f"{variant}-seed1", "problems.jsonl"))]
        assert any(r["trained_as_teacher"] for r in rows) == (teacher_seqs > 0)  # the log says what was trained
        shift = res["variants"][variant]["rung_shift"]["1"]
        assert shift and all(abs(sum(s["rung_share"].values()) - 1) < 1e-9 for s in shift if s["legal"])
    cfg = json.load(open(os.path.join(out, "frozen_teacher-seed1", "config.json")))
    assert cfg["train_teacher"] is False and (cfg["band_lo"], cfg["band_hi"]) == (0.4, 0.8)  # --opensir_args


def test_demo_gate_reports_the_vote_against_greedy_and_the_temperature_sweep(quick_toy):
    import demo
    res = demo.main(["gate", "--split", "dev", "--out", str(quick_toy / "gate"), "--eval_per_rung", "2",
                     "--eval_samples", "4", "--group", "2", "--max_new_tokens", "16"])
    assert res["problems"] == 10 and res["split"] == "dev" and (res["n"], res["group"]) == (4, 2)
    groups = res["problems"] * 2  # two disjoint groups of 2 in 4 samples
    assert 0 <= res["label_right_greedy_wrong"] + res["label_wrong_greedy_right"] <= groups
    assert all(0 <= res[k] <= 100 for k in ("greedy", "mean", "maj"))
    assert [float(t) for t in res["sweep_mean"]] == list(demo.SWEEP)
    assert res["sharpening_baseline"][1] == max(res["sweep_mean"].values())
    assert res["passes"] == (res["maj"] - res["greedy"] >= 5 and
                             res["label_right_greedy_wrong"] >= 5 * res["label_wrong_greedy_right"])
    assert json.load(open(quick_toy / "gate" / "gate.json"))["sweep_mean"] == res["sweep_mean"]


def test_toy_seed_0_is_the_shipped_weights_and_a_damaged_copy_is_rebuilt(quick_toy, monkeypatch, capfd):
    import shutil
    assert T.shipped_toy_intact() and sorted(os.listdir(T.TOY_SHIPPED)) == sorted(T.TOY_SHIPPED_SHA256)
    root = models.cache_root()
    path = T.ensure_toy_model(O.PROMPTS, root, seed=0)
    for f in T.TOY_SHIPPED_SHA256:  # a copy, byte for byte, with no build
        assert open(os.path.join(path, f), "rb").read() == open(os.path.join(T.TOY_SHIPPED, f), "rb").read()
    damaged = str(quick_toy / "shipped")
    shutil.copytree(T.TOY_SHIPPED, damaged)
    with open(os.path.join(damaged, "model.safetensors"), "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    monkeypatch.setattr(T, "TOY_SHIPPED", damaged)
    assert not T.shipped_toy_intact()
    other = T.ensure_toy_model(O.PROMPTS, str(quick_toy / "other-cache"), seed=0)  # the quick recipe builds it
    assert open(os.path.join(other, "model.safetensors"), "rb").read() != open(os.path.join(path, "model.safetensors"), "rb").read()
    assert "NOT the same as the shipped one" in capfd.readouterr().err


def test_demo_difference_is_paired_over_problems_at_the_last_common_step():
    import demo
    ev = lambda x: {s: {m: list(x) for m in ("mean", "maj")} for s in [*demo.SETTINGS, "greedy"]}  # noqa: E731
    a = {"1": {"0": ev([0, 0]), "20": ev([1.0, 0.5]), "40": ev([1, 1])}}
    b = {"1": {"0": ev([0, 0]), "20": ev([0.5, 0.5])}}
    rows = demo.difference(a, b)
    assert [(r["setting"], r["metric"]) for r in rows] == demo.METRICS and {r["step"] for r in rows} == {20}
    (d, se), = rows[0]["diff"]  # differences 0.5 and 0: mean 25 points, SE 0.354 / sqrt(2) = 25 points
    assert d == pytest.approx(25.0) and se == pytest.approx(25.0) and rows[0]["verdict"].startswith("no difference")
