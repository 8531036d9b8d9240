"""Tests of the built-in tiny model (`--model tiny`): tokenizer, cache, determinism, and that sampling
from it at the loop's settings gives legal problems, parsed answers and spread solve rates."""
import os
import random
from collections import Counter

import pytest
import torch

import opensir as O
import tiny as T


@pytest.fixture(scope="module")
def tiny():
    """The real tiny model from the shared cache (built once; the loop's tests use the same one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = T.ensure_tiny_model()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


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
    problems = [T._tiny_problem(random.Random(i))[0] for i in range(10)]
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
    T.build_tiny_model(str(tmp_path / "a"), seed=3)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    assert random.getstate() == py
    T.build_tiny_model(str(tmp_path / "b"), seed=3)
    T.build_tiny_model(str(tmp_path / "c"), seed=4)
    read = lambda d, f: (tmp_path / d / f).read_bytes()  # noqa: E731
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert read("a", f) == read("b", f), f
    assert read("a", "model.safetensors") != read("c", "model.safetensors")


def test_ensure_tiny_model_caches_and_never_leaves_half_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENSIR_CACHE", str(tmp_path))
    path = T.tiny_model_path(seed=5)
    assert path.startswith(str(tmp_path)) and f"v{T.TINY_VERSION}" in os.path.basename(path)
    calls = []

    def broken(p, seed=0):
        calls.append(p)
        open(os.path.join(p, "config.json"), "w").close()  # half-written, then it crashes
        raise RuntimeError("crash mid-build")

    monkeypatch.setattr(T, "build_tiny_model", broken)
    with pytest.raises(RuntimeError):
        T.ensure_tiny_model(seed=5)
    assert not os.path.exists(path) and os.listdir(tmp_path) == []  # no half build, no temp dir left

    def fake(p, seed=0):
        calls.append(p)
        with open(os.path.join(p, "config.json"), "w") as f:
            f.write(str(seed))

    monkeypatch.setattr(T, "build_tiny_model", fake)
    assert T.ensure_tiny_model(seed=5) == path and open(os.path.join(path, "config.json")).read() == "5"
    assert T.ensure_tiny_model(seed=5) == path and len(calls) == 2  # second call: cached, no rebuild
    assert os.listdir(tmp_path) == [os.path.basename(path)]
