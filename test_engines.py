"""Tests of engines.py and of opensir.generate over the two engines (`--engine generate` / `continuous`):
the same completions under greedy decoding, the same EOS handling, the same sampling distribution, Gemma-2's soft-capping kept or
the engine refused, out-of-memory degrading instead of crashing, the current weights always, and real
tiny runs of training and evaluation with each engine."""
import copy
import json
import os
import re
from collections import Counter

import numpy as np
import pytest
import torch

import engines as E
import eval as ev
import models
import opensir as O
from conftest import sample, tiny_path

ENGINES = ("generate", "continuous")


def llama3_tokenizer():
    """A byte-level BPE with Llama-3's chat template and its two end tokens (<|eot_id|> ends a turn,
    <|end_of_text|> the text): a real template with more than one EOS, built here with no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<|pad|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [O.student_prompt(f"What is {i} + {i * 7}?") + " \\boxed{12} think problem" for i in range(50)]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|pad|>")
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    return tok


@pytest.fixture(scope="module")
def llama():
    """A random-init Llama (~0.4M parameters) with the Llama-3 template and EOS list [<|eot_id|>, <|end_of_text|>]."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    tok = llama3_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|eot_id|>"),
                                            tok.convert_tokens_to_ids("<|end_of_text|>")]
    return model, tok


def _greedy(model, tok, prompts, n, engine):
    return sample(model, tok, prompts, n, 1.0, 50, 1.0, batch_size=64, engine=engine, greedy=True)


def _prompts(tok, k):
    return [O.chat(tok, O.student_prompt(f"What is {i} + {i * 7 % 13}? Then double it." + " Why?" * (i % 5)))
            for i in range(k)]


# ------------------------------------------------------------------------------------------------
# the same completions
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny", "llama"])
def test_greedy_completions_are_identical(which, request):
    """Argmax decoding leaves nothing to chance: both engines must return the very same token ids,
    EOS cut, truncation flag and text, for prompts of different lengths in one call."""
    model, tok = request.getfixturevalue(which)
    prompts = _prompts(tok, 24)
    a, b = (_greedy(model, tok, prompts, 40, e) for e in ENGINES)
    assert [c.ids for c in a] == [c.ids for c in b]
    assert [(c.truncated, c.text, c.prompt_ids) for c in a] == [(c.truncated, c.text, c.prompt_ids) for c in b]
    if which == "tiny":  # the trained toy model ends its answers: the EOS path is exercised
        assert any(not c.truncated for c in a) and all(len(c.ids) <= 40 for c in a)


def test_each_eos_id_ends_a_completion_and_truncation(llama):
    """Declare as EOS a token the model emits at step k: both engines stop there, keep it, and say not
    truncated, whichever place it has in the EOS list; with no EOS reached, exactly max_new_tokens."""
    model, tok = llama
    prompt = _prompts(tok, 3)[1:2]
    listed = list(model.generation_config.eos_token_id)
    free = _greedy(model, tok, prompt, 30, "generate")[0]
    assert free.truncated and len(free.ids) == 30  # random weights never pick the two real end tokens
    for e in ENGINES:
        c = _greedy(model, tok, prompt, 30, e)[0]
        assert c.truncated and c.ids == free.ids
    firsts = [i for i, t in enumerate(free.ids) if t not in free.ids[:i]]  # first occurrences
    try:
        for k, pos in enumerate((firsts[2], firsts[4])):
            stop = free.ids[pos]
            model.generation_config.eos_token_id = [stop, *listed] if k == 0 else [*listed, stop]
            for e in ENGINES:
                c = _greedy(model, tok, prompt, 30, e)[0]
                assert c.ids == free.ids[:pos + 1] and not c.truncated, (e, stop)
    finally:
        model.generation_config.eos_token_id = listed


# ------------------------------------------------------------------------------------------------
# the same distribution
# ------------------------------------------------------------------------------------------------

def _tv(x, y, labels):
    px = np.array([np.mean(x == k) for k in labels])
    py = np.array([np.mean(y == k) for k in labels])
    return 0.5 * np.abs(px - py).sum()


def _permutation_p(x: list, y: list, rounds: int = 2000) -> float:
    """p-value of the total-variation distance between two samples of labels, by permutation: the
    chance that a random split of the pooled labels is at least as far apart (no distributional assumption)."""
    labels = sorted(set(x) | set(y))
    idx = {k: i for i, k in enumerate(labels)}
    x, y = np.array([idx[a] for a in x]), np.array([idx[a] for a in y])
    ks = range(len(labels))
    seen = _tv(x, y, ks)
    pooled, rng = np.concatenate([x, y]), np.random.default_rng(0)
    hits = 0
    for _ in range(rounds):
        rng.shuffle(pooled)
        hits += _tv(pooled[:len(x)], pooled[len(x):], ks) >= seen - 1e-12
    return (hits + 1) / (rounds + 1)


def _votes(model, tok, n, engine, temperature=1.0, seed=0):
    prompts = [O.chat(tok, O.student_prompt("What is 3 + 4?"))] * (n // 2) + \
              [O.chat(tok, O.student_prompt("What is 12 - 5 + 9?"))] * (n // 2)
    outs = sample(model, tok, prompts, 24, temperature, 50, 1.0, batch_size=64, engine=engine, seed=seed * 100000)
    return [f"{i < n // 2}:{O.normalize_answer(O.extract_boxed(c.text))}" for i, c in enumerate(outs)]


def test_sampling_distributions_agree(tiny):
    """At the training settings (temperature 1, top-k 50, top-p 1) the answer-vote distributions of 200
    samples per engine must agree within sampling error: a permutation test of their total-variation
    distance, rejecting at p < 0.001. With fixed seeds the outcome is deterministic; the threshold means a
    correct engine would fail for about one seed in a thousand. The same test must see the difference a
    wrong sampler makes (temperature 0.3), or it would prove nothing."""
    model, tok = tiny
    a, b = _votes(model, tok, 200, "generate"), _votes(model, tok, 200, "continuous", seed=1)
    assert len(set(a)) >= 4  # a spread, not one answer
    assert _permutation_p(a, b) > 1e-3
    cold = _votes(model, tok, 200, "continuous", temperature=0.3, seed=2)
    assert _permutation_p(a, cold) < 1e-3


# ------------------------------------------------------------------------------------------------
# Gemma-2 soft-capping, out of memory, current weights
# ------------------------------------------------------------------------------------------------

def _gemma2(softcap):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("gemma2", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=64,
                               attn_logit_softcapping=softcap, final_logit_softcapping=None,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # large query/key weights so the cap really bites
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    return model, models.synthetic_tokenizer(300)


def test_gemma2_softcapping_refused_on_cpu_and_why():
    """The premise: transformers' paged eager attention drops the cap (its output differs from eager
    attention with the cap, and equals it without one). So on CPU the continuous engine is refused for a
    soft-capped Gemma-2 with a message naming the other engine, and --engine auto falls back to generate."""
    capped, tok = _gemma2(0.5)
    msg = E.softcap_refusal(capped)
    assert msg and "--engine generate" in msg and "flash-attn" in msg
    with pytest.raises(ValueError, match="--engine generate"):
        E.resolve_engine("continuous", capped)
    assert E.resolve_engine("auto", capped)[0] == "generate"
    with pytest.raises(ValueError, match="soft-caps"):
        _greedy(capped, tok, [O.chat(tok, "w10 w11")], 4, "continuous")
    uncapped, _ = _gemma2(None)
    assert E.softcap_refusal(uncapped) is None
    prompts = [O.chat(tok, " ".join(f"w{i + j}" for j in range(12))) for i in range(6, 14)]
    eos = [2]
    for name, model in (("capped", capped), ("uncapped", uncapped)):
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        gen = [c.ids for c in _greedy(model, tok, prompts, 12, "generate")]
        with pytest.MonkeyPatch.context() as mp:  # run the paged engine as if it kept the cap
            mp.setattr(E, "softcap_refusal", lambda m: None)
            raw = E.generate_continuous(model, ids, eos, 12, 1.0, 50, 1.0, greedy=True, kv_cache_gib=0.0)
        same = [r[:12] == g for r, g in zip(raw, gen)]
        assert all(same) if name == "uncapped" else not all(same), name
        assert model.config._attn_implementation == "eager"  # restored after the engine ran


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (flash attention keeps the cap)")


@gpu
def test_gpu_gemma2_continuous_keeps_softcapping_or_is_refused():
    """On CUDA with flash-attn, the continuous engine runs Gemma-2 and matches generate greedily (bf16:
    most, not all, completions; a near-tie can flip); without flash-attn it is refused."""
    model, tok = O.load_model("gemma-2-2b-it", device="cuda", dtype="bf16", random_init=True)
    if E.softcap_refusal(model):
        with pytest.raises(ValueError):
            E.resolve_engine("continuous", model)
        return
    prompts = [O.chat(tok, " ".join(f"w{i + j}" for j in range(20))) for i in range(10, 26)]
    a, b = (_greedy(model, tok, prompts, 32, e) for e in ENGINES)
    assert sum(x.ids == y.ids for x, y in zip(a, b)) >= 12


class _Failing:
    """A continuous-batching manager whose last three requests fail as transformers reports them."""

    def __init__(self, manager, fail_last: bool):
        self._m, self._fail_last, self._failing = manager, fail_last, set()

    def __getattr__(self, name):
        return getattr(self._m, name)

    def add_requests(self, **kw):
        ids = self._m.add_requests(**kw)
        self._failing = set(list(ids)[-3:]) if self._fail_last else set()
        return ids

    def get_result(self, timeout=None):
        r = self._m.get_result(timeout=timeout)
        if r is not None and r.is_finished() and r.request_id in self._failing:
            r.error = "CUDA out of memory. Tried to allocate 2.00 GiB"
        return r


def test_out_of_memory_shrinks_the_kv_cache_and_finishes(tiny, monkeypatch, capsys):
    """Out of memory while building the cache, and out of memory failing requests mid-run: the engine
    halves its KV budget, says so, reruns only what failed, and returns every completion."""
    model, tok = tiny
    real, seen = model.init_continuous_batching, []

    def with_a_memory_limit(*, generation_config, continuous_batching_config, workload_hints, **kw):
        blocks = continuous_batching_config.num_blocks
        seen.append((blocks, workload_hints.num_requests))
        if blocks > 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        manager = real(generation_config=generation_config, continuous_batching_config=continuous_batching_config,
                       workload_hints=workload_hints, **kw)
        return _Failing(manager, fail_last=blocks > 3)  # mid-run: the last three requests fail

    monkeypatch.setattr(model, "init_continuous_batching", with_a_memory_limit)
    prompts = _prompts(tok, 12)
    outs = sample(model, tok, prompts, 20, 1.0, 50, 1.0, batch_size=64, engine="continuous",
                      desc="student")
    assert all(o is not None and 1 <= len(o.ids) <= 20 for o in outs)
    assert [n for _, n in seen] == [12, 12, 3]  # only the failed three rerun
    assert seen[0][0] == 12 and seen[-1][0] == 3  # 12 prompts fill 12 pages of 64 tokens
    assert all(b2 == max(2, b1 // 2) for (b1, _), (b2, _) in zip(seen, seen[1:]))  # floor: one request's pages
    assert capsys.readouterr().out.count("[student] out of memory: retrying") == len(seen) - 1


def test_other_failures_are_raised_with_the_way_out(tiny, monkeypatch):
    model, tok = tiny

    def broken(**kw):
        raise RuntimeError("some kernel error")

    monkeypatch.setattr(model, "init_continuous_batching", broken)
    with pytest.raises(RuntimeError, match="(?s)some kernel error.*--engine generate"):
        sample(model, tok, _prompts(tok, 2), 8, 1.0, 50, 1.0, 64, engine="continuous")


def test_kv_budget_bounded_by_need_cap_and_memory(tiny):
    model, _ = tiny
    per_block = E.kv_bytes_per_token(model) * E.PAGE_TOKENS
    assert E.kv_budget_blocks(model, [10, 100], 40, 0.0) == 1 + 3  # ceil(50/64) + ceil(140/64)
    assert E.kv_budget_blocks(model, [10] * 100, 2000, 0.0) == 100 * 32  # all fit in free memory
    capped = E.kv_budget_blocks(model, [10] * 100, 2000, 64 * per_block / 2**30)
    assert capped == 64  # --kv_cache_gib caps it...
    assert E.kv_budget_blocks(model, [10], 2000, 1e-9) == 33  # ...but never below one request


def test_samples_from_the_weights_as_they_are_now(tiny):
    """The loop updates the sampler's weights in place after each optimiser step: the next call must use
    them (a fresh engine here; a kept manager is tested below)."""
    from transformers import AutoModelForCausalLM
    model, tok = tiny
    model = AutoModelForCausalLM.from_pretrained(tiny_path()).eval()  # a copy we may change
    prompts = _prompts(tok, 6)
    before = [c.ids for c in _greedy(model, tok, prompts, 12, "continuous")]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = [c.ids for c in _greedy(model, tok, prompts, 12, "continuous")]
    assert after != before
    assert after == [c.ids for c in _greedy(model, tok, prompts, 12, "generate")]


# ------------------------------------------------------------------------------------------------
# real runs with each engine
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_tiny_two_step_run_and_eval(engine, tmp_path):
    out = str(tmp_path / "run")
    O.main(["--model", "tiny", "--steps", "2", "--out", out, "--engine", engine, "--rounds_per_step", "1",
            "--init_pool_size", "2", "--init_pool_max_rounds", "2"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2] and all(r["pool"] > 1 for r in rows)
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "gsm8k.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"question": f"What is {i} + 2?", "answer": f"#### {i + 2}"}) + "\n")
    summary = ev.main(["--model", "tiny", "--benchmarks", "gsm8k", "--data-dir", str(data), "--n", "2",
                       "--engine", engine, "--out", str(tmp_path / "eval")])
    samples = [json.loads(line) for line in open(tmp_path / "eval" / "samples.jsonl")]
    assert len(samples) == 6 and all(s["tokens"] >= 1 for s in samples) and summary


def test_engine_flags_are_checked_before_loading():
    with pytest.raises(ValueError, match=re.escape("--engine must be one of auto, generate, continuous, vllm, got 'turbo'")):
        O.Config(engine="turbo").validate()
    with pytest.raises(ValueError, match=re.escape("--kv_cache_gib must be >= 0, got -1")):
        O.Config(kv_cache_gib=-1).validate()
    cfg = O.config_from_args(["--engine", "continuous", "--kv_cache_gib", "2.5"])
    assert (cfg.engine, cfg.kv_cache_gib) == ("continuous", 2.5)
    with pytest.raises(SystemExit):
        ev.build_parser().parse_args(["--model", "tiny", "--engine", "turbo"])


# ------------------------------------------------------------------------------------------------
# Seeded sampling, two-call rounds, the engine interface (compiled, kept manager, vLLM contract)
# ------------------------------------------------------------------------------------------------


def _tiny_engine_fixture():
    torch.set_num_threads(1)
    model, tok = O.load_model("tiny", device="cpu", dtype="fp32")
    return model, tok, O.eos_token_ids(model, tok)


def _encode(tok, texts, role=O.student_prompt):
    return [tok(O.chat(tok, role(t)), add_special_tokens=False)["input_ids"] for t in texts]


def test_uniform_draws_are_a_function_of_seed_and_position_only():
    seeds = torch.tensor([0, 1, 2**40 + 7, 2**62], dtype=torch.int64)
    a, b = E.uniform(seeds, 5), E.uniform(seeds.flip(0), 5).flip(0)
    assert torch.equal(a, b) and bool(((a > 0) & (a < 1)).all())  # order in the batch changes nothing
    assert not torch.equal(E.uniform(seeds, 5), E.uniform(seeds, 6))  # another position, another draw
    u = E.uniform(torch.arange(20000, dtype=torch.int64), 3)
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float((u < 0.1).double().mean()) - 0.1) < 0.01  # uniform


def test_seeded_sampler_draws_from_the_warped_distribution():
    """Over many seeds, the token frequencies match softmax(logits / T) restricted to the top-k (an oracle
    computed by hand here), and a token outside the top-k is never drawn."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    n = 20000
    proc = E.seeded_sampler(E.Sampling(temperature=0.7, top_k=3, top_p=1.0), list(range(n)), start=0)
    out = proc(torch.zeros((n, 4), dtype=torch.long), logits.expand(n, 5).clone())
    tokens = out.argmax(-1)
    assert bool((out.isfinite().sum(-1) == 1).all())  # exactly one finite logit per row
    p = torch.softmax(logits[0, :3] / 0.7, -1)
    freq = torch.bincount(tokens, minlength=5).double() / n
    assert freq[3:].sum() == 0 and torch.allclose(freq[:3], p.double(), atol=0.015)


def test_a_sequence_samples_the_same_whatever_its_batch():
    model, tok, eos = _tiny_engine_fixture()
    prompts = _encode(tok, [f"What is {i} + {2 * i}?" for i in range(6)])
    s = E.Sampling(1.0, 50, 1.0)
    whole = E.HFEngine(model, eos, tok.pad_token_id, 8).generate(prompts, 20, s, [11, 12, 13, 14, 15, 16])
    cut = lambda xs: [O.cut_at_eos(x, eos)[0] for x in xs]  # noqa: E731
    one_by_one = [E.HFEngine(model, eos, tok.pad_token_id, 1).generate([p], 20, s, [sd])[0]
                  for p, sd in zip(prompts, [11, 12, 13, 14, 15, 16])]
    assert cut(whole) == cut(one_by_one)
    other = E.HFEngine(model, eos, tok.pad_token_id, 8).generate(prompts, 20, s, [21, 22, 23, 24, 25, 26])
    assert cut(other) != cut(whole)  # the seed, not the batch, decides


def test_two_calls_equal_per_round_calls(tmp_path):
    """play_rounds over every round at once gives the candidates, rewards and selection of one call per round,
    under sampling (each sequence has its own seed) and under greedy."""
    model, tok, eos = _tiny_engine_fixture()
    cfg = O.Config(model="tiny", rounds_per_step=3, n_refs=2, teacher_max_new_tokens=48, student_max_new_tokens=32)
    pool = O.Pool()
    pool.add(["What is 1+1?", "What is 2+3?", "What is 4*5?"], [[], [], []],
             O.embed_texts(model, tok, ["What is 1+1?", "What is 2+3?", "What is 4*5?"]))
    refs = {0: [0, 1], 1: [2, 0], 2: [1, 1]}
    engine = E.HFEngine(model, eos, tok.pad_token_id, 64)
    together = O.play_rounds(engine, model, tok, pool, refs, 7, cfg, Counter())
    apart = {r: O.play_rounds(engine, model, tok, pool, {r: refs[r]}, 7, cfg, Counter())[r] for r in refs}
    key = lambda c: (c.completion.ids, c.parsed.problem, c.answers, [s.ids for s in c.solutions], c.reward, c.rank_key)  # noqa: E731
    assert [[key(c) for c in together[r]] for r in refs] == [[key(c) for c in apart[r]] for r in refs]
    assert O.select_for_training([together[r] for r in refs], cfg) == O.select_for_training([apart[r] for r in refs], cfg)


def test_compiled_decode_equals_eager_and_never_recompiles():
    import torch._dynamo
    from torch._dynamo.utils import counters
    model, tok, eos = _tiny_engine_fixture()
    short = _encode(tok, [f"What is {i} + {i}?" for i in range(5)])
    long = _encode(tok, [f"What is {i} * 7 + 12345 - {i} * 3?" for i in range(3)])
    assert len(long[0]) != len(short[0])
    eager = E.HFEngine(model, eos, tok.pad_token_id, 8)
    comp = E.HFEngine(model, eos, tok.pad_token_id, 8, compile_width=96, compile_backend="aot_eager")
    cut = lambda xs: [O.cut_at_eos(x, eos)[0] for x in xs]  # noqa: E731
    torch._dynamo.reset()
    greedy, sampled = E.Sampling(greedy=True), E.Sampling(1.0, 50, 1.0)
    assert cut(comp.generate(short, 16, greedy, list(range(5)))) == cut(eager.generate(short, 16, greedy, list(range(5))))
    graphs = counters["stats"]["unique_graphs"]
    old = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True  # another prompt width must not recompile
    try:
        assert cut(comp.generate(long, 16, greedy, list(range(3)))) == cut(eager.generate(long, 16, greedy, list(range(3))))
        assert cut(comp.generate(short, 16, sampled, list(range(5)))) == cut(eager.generate(short, 16, sampled, list(range(5))))
    finally:
        torch._dynamo.config.error_on_recompile = old
    assert counters["stats"]["unique_graphs"] == graphs == 1


def test_kept_continuous_manager_samples_the_current_weights():
    model, tok, eos = _tiny_engine_fixture()
    model = copy.deepcopy(model)  # its weights change below
    prompts = _encode(tok, [f"What is {i} + {3 * i}?" for i in range(8)])
    greedy = E.Sampling(greedy=True)
    cont, hf = E.ContinuousEngine(model, eos, tok.pad_token_id), E.HFEngine(model, eos, tok.pad_token_id, 8)
    cut = lambda xs: [O.cut_at_eos(x, eos)[0] for x in xs]  # noqa: E731
    before = cut(cont.generate(prompts, 20, greedy, list(range(8))))
    manager = cont.kept["manager"]
    assert before == cut(hf.generate(prompts, 20, greedy, list(range(8))))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = cut(cont.generate(prompts, 20, greedy, list(range(8))))
    assert cont.kept["manager"] is manager  # one manager for both calls
    assert after != before and after == cut(hf.generate(prompts, 20, greedy, list(range(8))))


def test_full_attention_within_the_window_is_exact_and_left_alone_beyond():
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("gemma2", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                               query_pre_attn_scalar=16, attn_implementation="eager")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    inside, beyond = torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        ref_in, ref_out = model(inside).logits, model(beyond).logits
        with E.full_attention_within_window(model, 8):
            assert set(model.config.layer_types) == {"full_attention"}
            assert torch.equal(model(inside).logits, ref_in)
        with E.full_attention_within_window(model, 16):  # longer than the window: nothing changes
            assert torch.equal(model(beyond).logits, ref_out)
    assert "sliding_attention" in model.config.layer_types  # restored


def test_budget_per_prompt_caps_each_completion():
    model, tok, eos = _tiny_engine_fixture()
    prompts = _encode(tok, [f"What is {i} + {3 * i}?" for i in range(6)], O.teacher_prompt)
    caps = [3, 5, 8, 13, 40, 64]
    for engine in (E.HFEngine(model, eos, tok.pad_token_id, 8), E.ContinuousEngine(model, eos, tok.pad_token_id)):
        out = engine.generate(prompts, 64, E.Sampling(1.0, 50, 1.0), list(range(6)), budgets=caps)
        assert all(len(O.cut_at_eos(o, eos)[0]) <= c for o, c in zip(out, caps)), engine.name


class FakeLLM:
    """vLLM's LLM interface as VLLMEngine uses it, recording every call in order."""

    def __init__(self, eos):
        self.calls, self.weights, self.eos, self.awake = [], None, eos, {"weights": True, "kv_cache": True}

    def generate(self, prompts, params, use_tqdm=False):
        assert all(self.awake.values()), "generate while asleep"
        self.calls.append(("generate", [p["prompt_token_ids"] for p in prompts], params))
        outs = []
        for p, sp in zip(prompts, params):
            ids = [5, 6, 7][: sp.max_tokens]
            stop = len(p["prompt_token_ids"]) % 2 == 0  # half stop on an EOS that vLLM holds back
            c = type("C", (), {"token_ids": ids, "finish_reason": "stop" if stop else "length",
                               "stop_reason": self.eos[-1] if stop else None})()
            outs.append(type("O", (), {"outputs": [c]})())
        return outs

    def apply_model(self, fn):
        self.calls.append(("push",))
        return [fn(self)]

    def load_weights(self, weights):
        assert self.awake["weights"], "weights pushed into freed memory"
        self.weights = {k: v.clone() for k, v in weights}

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))
        self.awake = {"weights": False, "kv_cache": False}

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))
        for t in tags:
            self.awake[t] = True


def test_vllm_engine_contract(monkeypatch):
    """Through the engine interface: the run's sampling settings and every EOS id reach each request with its
    seed; a held-back stop token is put back (the EOS cut works as for the other engines); weights are pushed
    after every optimiser step and before the next generation; memory is freed around training and retaken
    weights first, KV cache second."""
    import sys
    import types
    fake_vllm = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)
    fake_vllm.SamplingParams = SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    policy = torch.nn.Linear(2, 2)
    llm = FakeLLM(eos=[1, 9])
    engine = E.VLLMEngine("unused", [1, 9], 0, 64, 0.3, llm=llm)
    with pytest.raises(RuntimeError, match="before the policy's weights were pushed"):
        engine.generate([[3, 4]], 8, E.Sampling(), [0])
    for step in range(2):
        engine.update(policy)  # after the optimiser step (and once at start)
        assert torch.equal(llm.weights["weight"], policy.weight.detach())
        engine.wake()
        out = engine.generate([[3, 4], [3, 4, 5]], 8, E.Sampling(0.7, 20, 0.9), [101, 102])
        assert out == [[5, 6, 7, 9], [5, 6, 7]]  # the held-back EOS is back on the stopped request
        params = llm.calls[-1][2]
        assert [(p.temperature, p.top_k, p.top_p, p.max_tokens, p.seed, p.stop_token_ids) for p in params] == [
            (0.7, 20, 0.9, 8, 101, [1, 9]), (0.7, 20, 0.9, 8, 102, [1, 9])]
        engine.sleep()  # training
        with torch.no_grad():
            policy.weight.add_(1.0)
    kinds = [c[0] if c[0] != "wake_up" else c for c in llm.calls if c[0] != "generate"]
    assert kinds == ["push", "reset_prefix_cache", "sleep", ("wake_up", ("weights",)), "push",
                     "reset_prefix_cache", ("wake_up", ("kv_cache",)), "sleep"]
    with pytest.raises(RuntimeError, match="before the policy's weights were pushed"):
        engine.wake()  # asleep and not pushed: generating would sample freed or stale weights


def test_memory_plan_counts_parameters_by_hand():
    import models
    # gemma-2-2b-it: embedding 256000 x 2304; per layer q 2304x2048, k and v 2304x1024, o 2048x2304, MLP
    # 3 x 2304 x 9216, 4 norms of 2304; 26 layers; a final norm
    gemma = 256000 * 2304 + 26 * (2304 * 2048 + 2 * 2304 * 1024 + 2048 * 2304 + 3 * 2304 * 9216 + 4 * 2304) + 2304
    # llama-3.2-3b: embedding 128256 x 3072 (tied); per layer q and o 3072x3072, k and v 3072x1024, MLP 3 x 3072 x
    # 8192, 2 norms; 28 layers; a final norm
    llama = 128256 * 3072 + 28 * (2 * 3072 * 3072 + 2 * 3072 * 1024 + 3 * 3072 * 8192 + 2 * 3072) + 3072
    assert (gemma, llama) == (2_614_341_888, 3_212_749_824)
    for name, n in (("gemma-2-2b-it", gemma), ("llama-3.2-3b-instruct", llama)):
        config = models.architecture_config(name)
        assert models.count_parameters(config) == n
        plan = dict((k, b) for k, b, _ in models.memory_plan(O.Config(model=name, device="cpu"), config))
        assert plan["policy weights (fp32)"] == 4 * n and plan["AdamW moments (fp32)"] == 8 * n
    kv = models.kv_bytes(models.architecture_config("gemma-2-2b-it"), 2)
    assert kv == 2 * 26 * 4 * 256 * 2  # keys and values x layers x KV heads x head dim x bf16


def test_memory_plan_refuses_what_cannot_fit(monkeypatch):
    import models
    monkeypatch.setattr(models, "device_memory_bytes", lambda device: 16 << 30)
    monkeypatch.setattr(models, "pick_device", lambda device="auto": torch.device("cuda"))
    monkeypatch.setattr(models, "compute_dtype", lambda device, dtype="auto": torch.bfloat16)
    lines = []
    with pytest.raises(SystemExit, match="--gen_batch"):
        models.check_memory(O.Config(model="gemma-2-2b-it"), lines.append)
    assert "memory plan" in lines[0]
    models.check_memory(O.Config(model="tiny"), lines.append)  # the built-in models are not planned
