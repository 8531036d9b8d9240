"""Tests of the two generation engines (`--engine generate` / `continuous`): the same completions under
greedy decoding, the same EOS handling, the same sampling distribution, Gemma-2's soft-capping kept or
the engine refused, out-of-memory degrading instead of crashing, the current weights always, and real
tiny runs of training and evaluation with each engine."""
import json
import os

import numpy as np
import pytest
import torch

import bench
import engines as E
import eval as ev
import opensir as O
import tiny as T

ENGINES = ("generate", "continuous")


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = T.ensure_tiny_model()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


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
    return O.generate(model, tok, prompts, n, 1.0, 50, 1.0, batch_size=64, engine=engine, greedy=True)


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
    torch.manual_seed(seed)
    prompts = [O.chat(tok, O.student_prompt("What is 3 + 4?"))] * (n // 2) + \
              [O.chat(tok, O.student_prompt("What is 12 - 5 + 9?"))] * (n // 2)
    outs = O.generate(model, tok, prompts, 24, temperature, 50, 1.0, batch_size=64, engine=engine)
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
    return model, O.synthetic_tokenizer(300)


def test_gemma2_softcapping_refused_on_cpu_and_why():
    """The premise: transformers' paged eager attention drops the cap (its output differs from eager
    attention with the cap, and equals it without one). So on CPU the continuous engine is refused for a
    soft-capped Gemma-2 with a message naming the other engine, and --engine auto falls back to generate."""
    capped, tok = _gemma2(0.5)
    msg = E.softcap_refusal(capped)
    assert msg and "--engine generate" in msg and "flash-attn" in msg
    with pytest.raises(ValueError, match="--engine generate"):
        O.resolve_engine("continuous", capped)
    assert O.resolve_engine("auto", capped) == "generate"
    with pytest.raises(ValueError, match="soft-caps"):
        _greedy(capped, tok, [O.chat(tok, "w10 w11")], 4, "continuous")
    uncapped, _ = _gemma2(None)
    assert E.softcap_refusal(uncapped) is None
    prompts = [O.chat(tok, " ".join(f"w{i + j}" for j in range(12))) for i in range(6, 14)]
    eos = [2]
    for name, model in (("capped", capped), ("uncapped", uncapped)):
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        gen = [c.ids for c in _greedy(model, tok, prompts, 12, "generate")]
        raw = E._one_pass(model, ids, _greedy_config(eos, 12), 64, 512, 16, "")
        assert all(err is None for _, err in raw)
        same = [r[:12] == g for (r, _), g in zip(raw, gen)]
        assert all(same) if name == "uncapped" else not all(same), name
        assert model.config._attn_implementation == "eager"  # restored after the engine ran


def _greedy_config(eos, n):
    from transformers import GenerationConfig
    return GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=eos[0])


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (flash attention keeps the cap)")


@gpu
def test_gpu_gemma2_continuous_keeps_softcapping_or_is_refused():
    """On CUDA with flash-attn, the continuous engine runs Gemma-2 and matches generate greedily (bf16:
    most, not all, completions; a near-tie can flip); without flash-attn it is refused."""
    model, tok = O.load_model("gemma-2-2b-it", device="cuda", dtype="bf16", random_init=True)
    if E.softcap_refusal(model):
        with pytest.raises(ValueError):
            O.resolve_engine("continuous", model)
        return
    prompts = [O.chat(tok, " ".join(f"w{i + j}" for j in range(20))) for i in range(10, 26)]
    a, b = (_greedy(model, tok, prompts, 32, e) for e in ENGINES)
    assert sum(x.ids == y.ids for x, y in zip(a, b)) >= 12


@gpu
def test_gpu_llama_engines_agree_and_bench_smoke():
    """On CUDA (fp32, so kernels' rounding cannot flip random weights' near-ties): the same greedy
    completions from both engines at the llama-3.2-3b shape; then the benchmark's smoke sizes."""
    with torch.device("cuda"):  # initialise on the GPU: 3B random weights on CPU take a minute
        model, tok = O.load_model("llama-3.2-3b-instruct", device="cuda", dtype="fp32", random_init=True)
    prompts = [O.chat(tok, " ".join(f"w{i + j}" for j in range(10 + 3 * i))) for i in range(10, 26)]
    a, b = (_greedy(model, tok, prompts, 32, e) for e in ENGINES)
    assert sum(x.ids == y.ids for x, y in zip(a, b)) >= 14
    del model
    torch.cuda.empty_cache()
    rows = bench.main(["--device", "cuda", "--smoke"])
    assert all(r["tokens_per_s"] > 0 and r["peak_gib"] > 0 for r in rows if "tokens" in r)


def test_out_of_memory_shrinks_the_kv_cache_and_finishes(tiny, monkeypatch, capsys):
    """Out of memory while building the cache, and out of memory failing requests mid-run: the engine
    halves its KV budget, says so, reruns only what failed, and returns every completion."""
    model, tok = tiny
    real, seen = E._one_pass, []

    def with_a_memory_limit(model, prompts, gen_cfg, blocks, batch_tokens, max_req, desc):
        seen.append((blocks, len(prompts)))
        if blocks > 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        got = real(model, prompts, gen_cfg, blocks, batch_tokens, max_req, desc)
        if blocks > 3:  # mid-run: the last three requests fail as transformers reports them
            got = got[:-3] + [(None, "CUDA out of memory. Tried to allocate 2.00 GiB")] * 3
        return got

    monkeypatch.setattr(E, "_one_pass", with_a_memory_limit)
    prompts = _prompts(tok, 12)
    outs = O.generate(model, tok, prompts, 20, 1.0, 50, 1.0, batch_size=64, engine="continuous",
                      desc="student")
    assert all(o is not None and 1 <= len(o.ids) <= 20 for o in outs)
    assert [n for _, n in seen] == [12, 12, 3]  # only the failed three rerun
    assert seen[0][0] == 12 and seen[-1][0] == 3  # 12 prompts fill 12 pages of 64 tokens
    assert all(b2 == max(2, b1 // 2) for (b1, _), (b2, _) in zip(seen, seen[1:]))  # floor: one request's pages
    assert capsys.readouterr().out.count("[student] out of memory: retrying") == len(seen) - 1


def test_other_failures_are_raised_with_the_way_out(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(E, "_one_pass", lambda *a: [(None, "some kernel error")] * len(a[1]))
    with pytest.raises(RuntimeError, match="--engine generate"):
        O.generate(model, tok, _prompts(tok, 2), 8, 1.0, 50, 1.0, 64, engine="continuous")


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
    them (no manager, cache or weight copy survives a call)."""
    from transformers import AutoModelForCausalLM
    model, tok = tiny
    model = AutoModelForCausalLM.from_pretrained(T.ensure_tiny_model()).eval()  # a copy we may change
    prompts = _prompts(tok, 6)
    before = [c.ids for c in _greedy(model, tok, prompts, 12, "continuous")]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = [c.ids for c in _greedy(model, tok, prompts, 12, "continuous")]
    assert after != before
    assert after == [c.ids for c in _greedy(model, tok, prompts, 12, "generate")]
    assert not hasattr(model, "_cached_continuous_batching_manager")


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
    with pytest.raises(ValueError, match="--engine must be"):
        O.Config(engine="vllm").validate()
    with pytest.raises(ValueError, match="--kv_cache_gib"):
        O.Config(kv_cache_gib=-1).validate()
    cfg = O.config_from_args(["--engine", "continuous", "--kv_cache_gib", "2.5"])
    assert (cfg.engine, cfg.kv_cache_gib) == ("continuous", 2.5)
    with pytest.raises(SystemExit):
        ev.build_parser().parse_args(["--model", "tiny", "--engine", "vllm"])
