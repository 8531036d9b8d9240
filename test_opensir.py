"""Tests for opensir.py: hand-computed oracles for the maths, invariances of the tensor code, and real
runs of the loop on models the tests build themselves (no download)."""
import json
import math
import os

import numpy as np
import pytest
import torch

import opensir as O
import tiny as T

# ------------------------------------------------------------------------------------------------
# fixtures: a byte-level BPE tokenizer trained in-process and a small random Llama, saved to disk
# and loaded back through opensir.load_model (the real loading code)
# ------------------------------------------------------------------------------------------------

CORPUS = [O.teacher_prompt("What is 1+1?"), O.student_prompt("What is 2+3?"),
          "<think>new idea</think>\n<problem>What is 7 times 8?</problem>\n<concepts>multiplication, "
          "arithmetic facts</concepts>", "Therefore, the final answer is: $\\boxed{56}$"] * 20


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = ("<s>{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    return tok


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig
    path = str(tmp_path_factory.mktemp("small"))
    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small(small_dir):
    return O.load_model(small_dir, device="cpu")


# ------------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------------

GOOD = ("<think>uses area not sums</think>\n<problem>A square has side 3 cm. What is its area?</problem>\n"
        "<concepts>area of a square, multiplication</concepts>")


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
# rewards: hand-computed oracles
# ------------------------------------------------------------------------------------------------

def test_majority_vote_ties_and_unparsed():
    assert O.majority_vote(["2", None, "3", "3", "2", None]) == ("2", 0.5, 4)  # tie -> earliest sampled
    assert O.majority_vote(["3", None, "2", "3"]) == ("3", 2 / 3, 3)
    assert O.majority_vote([None] * 8) == (None, 0.0, 0)


def test_band_y_min():
    assert O.band_y_min(8, 0.5, 0.9) == 0.25  # 4/8, 5/8, 6/8, 7/8
    assert O.band_y_min(4, 0.5, 0.9) == 0.5  # 2/4, 3/4
    assert O.band_y_min(10, 0.5, 0.9) == 0.2  # 5/10 .. 9/10


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


def test_solvability_with_fewer_parsed_answers():
    # 8 samples, 4 unparsed: 3 of the 4 parsed agree -> s = 0.75, y_min still from G = 8
    _, s, n = O.majority_vote(["5", "5", None, "5", "6", None, None, None])
    assert (s, n) == (0.75, 4)
    assert O.solvability_reward(s, 8, 0.5, 0.9) == pytest.approx(0.8125)


def test_length_reward_cap():
    assert O.length_reward([100, 300], 1000) == pytest.approx(0.2)
    assert O.length_reward([500, 1500], 1000) == pytest.approx(1.0)
    assert O.length_reward([3000, 4000], 1000) == 1.0
    assert O.length_reward([], 1000) == 0.0


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


def _cfg(**kw):
    return O.Config(**kw)


def test_teacher_and_student_reward_weights():
    cfg = _cfg()
    assert O.teacher_total(1.0, 0.5, 0.2, 1.0, cfg) == pytest.approx(1.0 + 0.5 + 0.2 + 0.1)
    assert O.teacher_total(1.0, 0.5, 0.2, 1.0, _cfg(w_div=0)) == pytest.approx(1.3)
    r = O.student_rewards(["4", "5", None], "4", [True, True, False], cfg)
    assert r == pytest.approx([1.1, 0.1, 0.0])


def _cand(group, legal, answers=(), lengths=(), think=True, emb=None):
    text = GOOD if legal else "<problem>x</problem>"
    parsed = O.parse_teacher(text)
    parsed.has_think = think
    sols = [O.Completion([1], [5] * n, "Therefore, the final answer is: $\\boxed{1}$", False) for n in lengths]
    c = O.Candidate(group, O.Completion([1], [5, 2], text, False), parsed, sols, list(answers))
    c.embedding = emb
    return c


def test_score_candidates_pairs_length_with_its_own_problem():
    # the authors' code misaligned length rewards once a legal problem had no parsed answer
    cfg = _cfg(w_div=0)
    cands = [_cand(0, True, [None] * 8, [10] * 8), _cand(0, False),
             _cand(0, True, ["1"] * 6 + ["2"] * 2, [500] * 8)]
    O.score_candidates(cands, None, cfg)
    a, illegal, b = cands
    assert (a.solv, a.length, a.majority, a.scored) == (0.0, 0.0, None, False)  # no parsed answer: no length
    assert illegal.reward == 0.0 and illegal.combined == 0.0
    assert b.solve_rate == 0.75 and b.solv == pytest.approx(0.8125) and b.length == 0.5
    assert b.reward == pytest.approx(0.8125 + 0.5 + 0.1)
    assert b.student_rewards == pytest.approx([1.1] * 6 + [0.1] * 2)


def test_selection_highest_variance_group_and_best_student():
    combined = np.array([[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]], dtype=float)
    legal = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    assert O.select_teacher_group(combined, legal) == 1
    # all-illegal groups rank last even against a zero-variance legal group
    assert O.select_teacher_group(np.zeros((2, 4)), np.array([[0] * 4, [0, 1, 0, 0]], dtype=bool)) == 1
    cands = [_cand(0, True), _cand(0, False), _cand(1, True)]
    cands[0].combined, cands[1].combined, cands[2].combined = 0.5, 9.0, 0.7
    cands[0].n_parsed = cands[2].n_parsed = 8  # legal with parsed answers: they have a score
    assert O.select_student_problem(cands) == 2
    assert O.select_student_problem([_cand(0, False)]) is None


# ------------------------------------------------------------------------------------------------
# advantages and loss
# ------------------------------------------------------------------------------------------------

def test_group_advantages():
    a = O.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]]), 1e-4)
    std = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)  # unbiased: 0.5
    assert a[0].tolist() == pytest.approx([0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3)
    assert a[1].tolist() == [0.0] * 4  # zero variance: exactly 0, not NaN
    assert not torch.isnan(O.group_advantages(torch.zeros(1, 8), 1e-4)).any()


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


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------

def test_cut_at_eos():
    assert O.cut_at_eos([5, 6, 2, 7, 2], [2]) == ([5, 6, 2], False)  # through the first EOS
    assert O.cut_at_eos([5, 2, 2, 2], [2]) == ([5, 2], False)  # pad == EOS: the EOS is kept
    assert O.cut_at_eos([5, 6, 7], [2]) == ([5, 6, 7], True)  # truncated: every token is real
    assert O.cut_at_eos([5, 9, 6], [2, 9]) == ([5, 9], False)  # any end-of-turn id


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


# ------------------------------------------------------------------------------------------------
# log-probs: independent computation, padding and micro-batching invariance
# ------------------------------------------------------------------------------------------------

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


def test_embedding_padding_invariance(small):
    model, tok = small
    a = O.embed_texts(model, tok, ["What is 2+2?"])
    b = O.embed_texts(model, tok, ["What is 2+2?", "A much longer problem about seven apples and pears."])
    assert a.shape == (1, 32) and torch.allclose(a[0], b[0], atol=1e-5)


def _loss_and_grads(model, ref_model, rounds, cfg):
    import copy
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return O.optimise(m, ref_model, opt, sched, rounds, cfg, None)


def test_loss_equals_independent_per_token_computation_and_micro_batch_invariance(small):
    import copy
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


def _grad_vector(model, rounds, cfg):
    import copy
    m = copy.deepcopy(model)
    O.set_loss_weights(rounds, cfg.loss_agg, 100)
    for mb in [sum(rounds, [])[i: i + cfg.train_micro_batch] for i in range(0, 4, cfg.train_micro_batch)]:
        loss = 0
        for s, lp in zip(mb, O.sequence_logprobs(m, mb, cfg.temperature, 1024)):
            l_t, _ = O.grpo_token_loss(lp, lp.detach(), None, s.advantage, 0.2, 0.0)
            loss = loss + s.weight * (l_t * torch.tensor(s.mask, dtype=l_t.dtype)).sum()
        loss.backward()
    return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])


def test_several_updates_per_rollout_use_the_rollout_log_probs(small):
    """With mu = 2 the second update's ratio is against the rollout's log-probs, so it leaves 1 and
    the clip engages; with mu = 1 the ratio is exactly 1 and nothing is clipped."""
    import copy
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
    import copy
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
    import copy
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
    outs = O.generate(model, tok, prompts, 4, 1.0, 50, 1.0, batch_size=16, desc="student")
    assert len(outs) == 10 and all(o is not None and 1 <= len(o.ids) <= 4 for o in outs)
    assert sizes[:3] == [10, 8, 4] and max(sizes[3:]) <= 2
    assert "out of memory: retrying with --gen_batch 2" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# config and CLI
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [
    (dict(band_lo=0.9, band_hi=0.5), "band_lo"),
    (dict(student_group=1), "student_group"),
    (dict(teacher_group=0), "teacher_group"),
    (dict(loss_agg="mean"), "loss_agg"),
    (dict(w_div=-1.0), "w_div"),
    (dict(temperature=0.0), "temperature"),
])
def test_config_rejects_contradictions(kw, msg):
    with pytest.raises(ValueError, match=msg):
        O.Config(**kw).validate()


def test_cli_generated_from_config(capsys):
    cfg = O.config_from_args(["--model", "tiny", "--n-refs", "3", "--w_div", "0", "--no-grad-ckpt"])
    assert (cfg.n_refs, cfg.w_div, cfg.grad_ckpt) == (3, 0.0, False)
    assert cfg.rounds_per_step == O.TINY_DEFAULTS["rounds_per_step"]  # tiny defaults fill the rest
    assert O.config_from_args(["--model", "tiny", "--rounds_per_step", "5"]).rounds_per_step == 5
    assert O.config_from_args(["--model", "some/model"]).rounds_per_step == 16  # paper defaults
    assert "tiny model defaults" in capsys.readouterr().out
    helps = O._field_help()
    assert all(f.name in helps for f in __import__("dataclasses").fields(O.Config))


def test_unknown_model_name_lists_short_names():
    with pytest.raises(ValueError, match="gemma-2-2b-it"):
        O.resolve_model("gemma2b")
    assert O.resolve_model("gemma-2-2b-it") == "google/gemma-2-2b-it"


def test_main_rejects_bad_flags_before_loading(tmp_path):
    with pytest.raises(SystemExit, match="band_lo"):
        O.main(["--model", "no-such-model", "--band_lo", "0.9", "--band_hi", "0.1", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------
# real runs of the loop
# ------------------------------------------------------------------------------------------------

FAST = ["--rounds_per_step", "1", "--n_refs", "2", "--teacher_group", "4", "--student_group", "4",
        "--teacher_max_new_tokens", "24", "--student_max_new_tokens", "16", "--init_pool_size", "0",
        "--warmup_steps", "0", "--lr", "1e-3"]


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_round_with_no_legal_problem_does_not_crash(small_dir, tmp_path):
    # a random model writes no legal problem: the run must log it and go on
    out = str(tmp_path / "run")
    O.main(["--model", small_dir, "--out", out, "--steps", "2", *FAST])
    m = _rows(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in m] == [1, 2]
    assert all(r["rounds/no_legal"] == 1 and r["train/student_seqs"] == 0 for r in m)
    assert all(not math.isnan(r["loss"]) for r in m)
    assert os.path.exists(os.path.join(out, "ckpt-00002", "state.pt"))


def test_out_with_a_different_config_is_refused(small_dir, tmp_path):
    out = str(tmp_path / "run")
    O.main(["--model", small_dir, "--out", out, "--steps", "1", *FAST])
    before = open(os.path.join(out, "config.json")).read()
    with pytest.raises(SystemExit, match="already holds a run"):
        O.main(["--model", small_dir, "--out", out, "--steps", "1", *FAST])
    with pytest.raises(SystemExit, match="different config"):
        O.main(["--model", small_dir, "--out", out, "--steps", "2", "--resume", *FAST, "--band_hi", "0.8"])
    assert open(os.path.join(out, "config.json")).read() == before


TOYS = {
    "toy-llama": dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "toy-gemma2": dict(model_type="gemma2", vocab_size=300, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True),
}


@pytest.mark.parametrize("toy", sorted(TOYS))
def test_random_init_builds_architecture_without_download(monkeypatch, tmp_path, toy):
    monkeypatch.setitem(O.ARCHITECTURES, toy, TOYS[toy])
    model, tok = O.load_model(toy, device="cpu", random_init=True, seed=3)
    again, _ = O.load_model(toy, device="cpu", random_init=True, seed=3)
    assert len(tok) == model.config.vocab_size == 300
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    if toy == "toy-gemma2":
        assert model.config._attn_implementation == "eager"  # keeps the attention soft-capping
    # every teacher output counts as legal, so a round reaches the student phase at full size
    out = str(tmp_path / "run")
    O.main(["--model", toy, "--random_init", "--out", out, "--steps", "1", *FAST])
    m = _rows(os.path.join(out, "metrics.jsonl"))[0]
    assert m["teacher/legal_rate"] == 1.0 and m["train/student_seqs"] == 4
    with pytest.raises(ValueError, match="gemma-2-2b-it"):
        O.load_model("nope", random_init=True)


def test_written_down_architectures_are_the_published_models():
    """Parameter counts of the real checkpoints (meta device: nothing is allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    published = {"gemma-2-2b-it": 2_614_341_888, "llama-3.2-3b-instruct": 3_212_749_824,
                 "qwen2.5-1.5b-instruct": 1_543_714_304}
    assert set(published) == set(O.ARCHITECTURES) == set(O.MODELS)
    for name, arch in O.ARCHITECTURES.items():
        arch = dict(arch)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch))
        assert sum(p.numel() for p in model.parameters()) == published[name], name


def test_real_gemma_llama_qwen_architectures_are_valid():
    from transformers import AutoConfig
    for name, arch in O.ARCHITECTURES.items():
        arch = dict(arch)
        cfg = AutoConfig.for_model(arch.pop("model_type"), **arch)
        assert cfg.vocab_size > 100_000, name
    assert O.attention_for("gemma2") == "eager" and O.attention_for("llama") == "sdpa"


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


# ------------------------------------------------------------------------------------------------
# GPU-only (issue 4): skipped on CPU machines such as CI
# ------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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


@gpu
def test_gpu_default_round_fits_in_70_gib(tmp_path):
    """One full round of the paper's recipe for gemma-2-2b-it (random weights, full-length outputs)."""
    torch.cuda.reset_peak_memory_stats()
    O.main(["--model", "gemma-2-2b-it", "--random_init", "--init_pool_size", "0", "--rounds_per_step", "1",
            "--steps", "1", "--out", str(tmp_path / "run")])
    m = _rows(str(tmp_path / "run" / "metrics.jsonl"))[0]
    assert m["peak_mem_gib"] < 70, m


# ------------------------------------------------------------------------------------------------
# the built-in tiny model: real generation through the whole loop
# ------------------------------------------------------------------------------------------------

TINY_FAST = ["--rounds_per_step", "2", "--init_pool_size", "2", "--init_pool_max_rounds", "2"]
TIMING_KEYS = ("sec/", "tok_per_sec/", "peak_mem")


def _params(path):
    from transformers import AutoModelForCausalLM
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def test_tiny_two_step_run(tmp_path):
    """`--model tiny --steps 2`: real rounds with legal problems and votes, parameters change, the
    checkpoint loads with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = str(tmp_path / "run")
    O.main(["--model", "tiny", "--steps", "2", "--out", out])
    m = _rows(os.path.join(out, "metrics.jsonl"))
    probs = _rows(os.path.join(out, "problems.jsonl"))
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
    before, after = _params(T.ensure_tiny_model()), _params(ckpt)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    AutoModelForCausalLM.from_pretrained(ckpt)
    AutoTokenizer.from_pretrained(ckpt)


def test_tiny_run_without_diversity(tmp_path):
    """Every reward weight may be 0: no embeddings are computed and no reference model is needed."""
    out = str(tmp_path / "run")
    O.main(["--model", "tiny", "--steps", "1", "--out", out, "--w_div", "0", "--beta", "0", *TINY_FAST])
    probs = _rows(os.path.join(out, "problems.jsonl"))
    assert probs and all(p["rewards"]["diversity"] == 0.0 for p in probs)
    assert any(p["legal"] for p in probs)


def test_resume_equals_uninterrupted_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    O.main(["--model", "tiny", "--steps", "2", "--out", a, *TINY_FAST])
    O.main(["--model", "tiny", "--steps", "1", "--out", b, *TINY_FAST])
    O.main(["--model", "tiny", "--steps", "2", "--out", b, "--resume", *TINY_FAST])
    pa, pb = _rows(os.path.join(a, "problems.jsonl")), _rows(os.path.join(b, "problems.jsonl"))
    assert pa == pb  # every generated problem, reward and answer of both steps
    ma, mb = _rows(os.path.join(a, "metrics.jsonl")), _rows(os.path.join(b, "metrics.jsonl"))
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)}  # noqa: E731
    assert [strip(r) for r in ma] == [strip(r) for r in mb]
    wa, wb = _params(os.path.join(a, "ckpt-00002")), _params(os.path.join(b, "ckpt-00002"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-u", "opensir.py", "--model", "tiny", "--steps", "50", "--save_every", "100",
           "--out", out, *TINY_FAST]
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(O.__file__)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait for the first step to finish, then interrupt the second
        lines.append(line)
        if line.startswith("step 1/50"):
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted: saved" in rest
    assert os.path.exists(os.path.join(out, "ckpt-00001", "state.pt"))
    assert [r["step"] for r in _rows(os.path.join(out, "metrics.jsonl"))] == [1]
    O.main(["--model", "tiny", "--steps", "2", "--save_every", "100", "--out", out, "--resume", *TINY_FAST])
    assert [r["step"] for r in _rows(os.path.join(out, "metrics.jsonl"))] == [1, 2]


def test_failed_start_leaves_out_reusable(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="unknown model"):
        O.main(["--model", "gemma2b", "--out", out])
    with pytest.raises(OSError, match="could not load"):  # a directory that holds no model
        os.makedirs(tmp_path / "empty")
        O.main(["--model", str(tmp_path / "empty"), "--out", out])
    assert not os.path.exists(os.path.join(out, "config.json"))


def test_readme_flags_table_matches_config():
    """The README's flags table is generated from Config; this catches drift."""
    import dataclasses
    readme = open(os.path.join(os.path.dirname(os.path.abspath(O.__file__)), "README.md")).read()
    for f in dataclasses.fields(O.Config):
        assert f"| `--{f.name}` | `{f.default!r}` |" in readme, f.name


def test_tiny_bf16_path_keeps_fp32_master_weights(tmp_path):
    """--dtype bf16 runs the GPU code path on CPU: bf16 autocast over fp32 master weights, a bf16
    sampler copy refreshed after each update, a bf16 frozen model. Checkpoints hold the fp32 weights."""
    from safetensors.torch import load_file
    out = str(tmp_path / "run")
    O.main(["--model", "tiny", "--steps", "1", "--dtype", "bf16", "--out", out, *TINY_FAST])
    m = _rows(os.path.join(out, "metrics.jsonl"))[0]
    assert m["train/teacher_seqs"] > 0 and math.isfinite(m["loss"])
    weights = load_file(os.path.join(out, "ckpt-00001", "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())
    before = load_file(os.path.join(T.ensure_tiny_model(), "model.safetensors"))
    assert any(not torch.equal(before[k], weights[k]) for k in before)
