"""OpenSIR: Open-Ended Self-Improving Reasoner. The method and the loop, read top to bottom.

Kwan, Ong Jun Leang, Vougiouklis, Pan, Valentino, Minervini. arXiv 2511.00602 (2025).

One model plays two roles. As *teacher* it reads a problem from a growing pool and writes a new,
conceptually different one. As *student* it solves each new problem G times; the most common final
answer is the pseudo-label and the share of answers that agree with it is the problem's solve rate.
Both roles are trained together with GRPO on rewards the model computes itself: no labels.
Two variants, one flag apart (`--recipe`, see RECIPES): `code`, the authors' released code (default),
and `paper`, the equations of the paper's later text (v3/v4).

The sections follow the algorithm:
  1. config and recipes        5. rewards                     9. log-probs and the GRPO loss
  2. prompts and parsing       6. one round                  10. the pool and the starting pool
  3. sampling, the embedding   7. selection                  11. the loop (train)
  4. the answer vote           8. advantages and the batch   12. main()
Plumbing a first reading skips lives beside this file and is called by name: checker.py (answer strings,
the evaluation checker), engines.py (generation engines), models.py (loading), parallel.py (torchrun,
FSDP), runs.py (run directory, checkpoints, resume, Ctrl-C), cli.py (the command line).

Where this code departs from the paper and the authors' code, on purpose:
  D1. The diversity embedding is the frozen initial model's own last hidden layer, mean-pooled and
      centred on the pool's mean (--div_embed), not a separate 7B embedding model.
  D2. The pool grows once per step, after all its rounds (the paper's Algorithm 1); the authors' code
      grows it after every round. Recipe code's diversity is against the step-start pool plus the
      round's own candidates.
  D3. Answers vote by a normalised key (checker.normalize_answer): `1/2`, `\\frac12` and `0.5` agree; the
      authors compared strings.
  D4. A step's rounds are generated in two calls (all teacher prompts, then all student prompts), and
      every sequence samples from its own seeded stream: the same distribution as HF sampling, other
      random draws, and (with --engine generate) the same rollouts on any number of processes.
  D5. One process plays the step's 16 rounds itself; the authors ran 8 accumulation steps on 2 GPUs.
  D6. fp32 master weights with bf16 compute on a GPU (at lr 3e-7 a bf16 weight cannot move).
  D7. The frozen initial model serves both the KL reference and the diversity embedding.
  D8. A round with no legal problem, or none with a score, trains nothing and goes on; a zero-variance
      group gets advantage 0 (the authors' code crashes or divides by zero there).
  D9. Prompts are our wording of the paper's instructions, in the user turn (Gemma has no system role).
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import cli
import engines
import models
import parallel
import runs
from checker import extract_boxed, final_answer, normalize_answer


# ================================================================================================
# 1. Config and recipes
# ================================================================================================


@dataclass
class Config:
    """Every constant of the method. Defaults are recipe `code`: the authors' released config for
    Llama-3.2-3B-Instruct (RECIPES holds the paper's later variant)."""

    # run
    recipe: str = "code"  # preset applied under your flags: "code" (authors' released code) or "paper" (v3/v4 text); see RECIPES
    model: str = "tiny"  # short name (see models.MODELS), hub id, local path, or "tiny" (built in-process)
    out: str = "runs/opensir"  # output directory: checkpoints, metrics.jsonl, problems.jsonl
    resume: bool = False  # continue from the latest checkpoint in --out
    resume_from: str = ""  # continue from this checkpoint of --out (an older one, when the newest is damaged)
    seed: int = 0  # seeds python, numpy and torch
    steps: int = 200  # optimisation steps
    save_every: int = 25  # checkpoint every N steps (and at the end)
    report_to: str = "none"  # also log each step to "tensorboard" or "wandb" (pip install -r requirements-track.txt)
    # one round
    n_refs: int = 4  # reference problems drawn from the pool per round
    teacher_group: int = 8  # g: teacher samples per reference
    student_group: int = 8  # G: student solutions per legal problem
    temperature: float = 1.0  # sampling temperature, both roles (log-probs are taken at it too)
    top_k: int = 50  # sampling top-k, both roles
    top_p: float = 1.0  # sampling top-p, both roles
    teacher_max_new_tokens: int = 2048  # teacher completion budget
    student_max_new_tokens: int = 2048  # student completion budget
    # teacher rewards
    band_lo: float = 0.5  # solvability band lower edge
    band_hi: float = 0.9  # solvability band upper edge
    len_cap: int = 1000  # solution-length reward saturates at this many student tokens
    div_topk: int = 5  # diversity: mean of this many largest cosine similarities
    div_embed: str = "center"  # "center": subtract the pool's mean embedding (anisotropy); "raw"
    solve_rate_over: str = "parsed"  # solve-rate denominator: "parsed" answers (code) or the whole "group" G (paper Eq. 1)
    tent_floor: str = "band"  # tent value at the band edges: "band" 1/#{k/G in band} (code) or "group" 1/G (paper Eq. 2)
    div_mode: str = "topk"  # "topk": (1 - mean top-k cos)/2 vs pool and round (code); "nearest": 1 - max cos vs the pool before the step (paper Eq. 4)
    teacher_format: str = "think"  # teacher format reward: a <think> block, "think" (code), or valid problem and concepts "tags" (paper)
    w_solv: float = 1.0  # weight of the solvability reward
    w_div: float = 1.0  # weight of the diversity reward
    w_len: float = 1.0  # weight of the solution-length reward
    w_teacher_format: float = 0.1  # weight of the teacher format reward (see teacher_format)
    # student rewards
    w_correct: float = 1.0  # weight of agreeing with the majority answer
    w_student_format: float = 0.1  # weight of the student format reward (see student_format)
    student_format: str = "final_line"  # student format reward: the asked "final_line" last (code) or any "boxed" answer (paper)
    # selection: which groups are trained
    select_key: str = "combined"  # ranks candidates: "combined" = w_solv solv + w_div div (code) or "total" = R_T (paper)
    select_scope: str = "round"  # "round": 1 teacher group and 1 problem per round (code); "step": top fractions of the step (paper)
    select_teacher_frac: float = 0.5  # select_scope step: share of the step's reference groups kept, by variance of the key
    select_student_frac: float = 0.5  # select_scope step: problems kept, as a share of the step's reference groups, by key
    # GRPO
    rounds_per_step: int = 16  # rounds (one teacher + one student group each) per optimiser step
    updates_per_rollout: int = 1  # optimiser steps on each batch of rollouts (mu)
    clip_eps: float = 0.2  # PPO clip range
    beta: float = 1e-4  # k3 KL weight against the frozen initial model (0: no reference model)
    adv_eps: float = 1e-4  # A = (R - mean) / (std + adv_eps)
    loss_agg: str = "token"  # "token" (authors), "sequence", "role" or "constant" (Dr. GRPO); see set_loss_weights
    lr: float = 3e-7  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 25  # linear warm-up, then constant
    max_grad_norm: float = 0.5  # gradient-norm clip
    nonfinite_stop: int = 3  # a step whose gradient is not finite is skipped; this many in a row stop the run
    # starting pool
    seed_problem: str = "What is 1+1?"  # the one problem the pool grows from
    start_pool: str = "grow"  # "grow": grow init_pool_size in-band problems before step 1 (code); "seed": the seed problem alone (paper)
    init_pool_size: int = 512  # grow the starting pool to this many in-band problems (0: skip)
    init_pool_max_rounds: int = 2000  # give up growing the starting pool after this many rounds
    init_pool_min_chars: int = 30  # starting-pool filter: shortest problem kept
    init_pool: str = ""  # JSONL of a starting pool to load instead of growing one
    # compute
    device: str = "auto"  # "auto" (cuda if present), "cuda", "cpu"
    threads: int = 0  # CPU threads for torch (0: torch's default)
    dtype: str = "auto"  # compute dtype for generation/autocast: "auto" (bf16 on cuda), "bf16", "fp32"
    attn: str = "auto"  # attention implementation; "auto": eager for Gemma-2 (soft-capping), else sdpa
    gen_batch: int = 64  # sequences per generate() call (halved on out-of-memory)
    train_micro_batch: int = 4  # sequences per forward/backward
    logprob_chunk: int = 1024  # tokens per lm_head/log-softmax chunk (no full-vocab tensor for the batch)
    grad_ckpt: bool = True  # gradient checkpointing (on cuda)
    random_init: bool = False  # random weights from the architecture in models.MODELS (no download)
    engine: str = "auto"  # "generate" (HF, padded batches), "continuous" (paged KV cache), "vllm"; "auto": engines.auto_engine, by measurement
    kv_cache_gib: float = 0.0  # cap on the continuous engine's KV cache in GiB (0: sized from free memory)
    compile: bool = False  # --engine generate: compiled decode over a static KV cache (CUDA graphs on a GPU), prompts padded to 1024 tokens
    vllm_gpu_memory: float = 0.3  # --engine vllm: share of the GPU its weights and KV cache may take (training keeps the rest)
    # several processes (torchrun --nproc_per_node N): rounds of a step shared out across N ranks
    dist_timeout: int = 1800  # seconds a rank waits for the others at a collective before the run stops (a rank that died)
    train_teacher: bool = True  # False: the frozen-teacher ablation (teacher groups get no gradient)
    fsdp: bool = False  # torchrun only: shard fp32 weights, gradients and AdamW state over the ranks (FSDP2); generation and reference stay whole per rank

    def validate(self, given: Optional[dict] = None) -> None:
        """Refuse a bad setting before any model loads: CHOICES, BOUNDS and config_rules below, and what no
        setting may be (cli.value_errors: NaN, an unknown model, an unreadable --init_pool). `given`, the
        flags typed, also refuses a flag that the other settings would ignore (NEEDS)."""
        errors = cli.table_errors(self, CHOICES, BOUNDS) + config_rules(self, given) + cli.value_errors(self)
        if errors:
            raise ValueError("invalid config:\n  " + "\n  ".join(errors))


# The tiny model is for reading the code run on a laptop: same loop, smaller numbers. Applied only
# to fields the user did not set on the command line; printed at start.
TINY_DEFAULTS = dict(
    rounds_per_step=2, teacher_max_new_tokens=64, student_max_new_tokens=48, init_pool_size=4,
    init_pool_max_rounds=4, lr=1e-5, warmup_steps=0, save_every=1, beta=0.04, gen_batch=256,
    train_micro_batch=16, threads=1,  # one thread: small matmuls gain nothing from two, and lose a lot on a busy machine
)


# The toy world (`--model toy`, tiny.py): for showing learning on a CPU (demo.py). Longer worked
# solutions than the tiny model's, and more student groups per step.
TOY_DEFAULTS = dict(TINY_DEFAULTS, rounds_per_step=4, student_max_new_tokens=64, lr=1e-4)
SMALL_MODEL_DEFAULTS = {"tiny": TINY_DEFAULTS, "toy": TOY_DEFAULTS}  # the built-in models' smaller numbers


# The two OpenSIRs (SPEC "Two recipes"): the authors' released code, which produced the paper's first
# results, and the paper's later text (arXiv 2511.00602 v3/v4). Each row of that table is a Config field,
# so an ablation can mix them; `--recipe` applies one set under the flags you give. "code" is Config's
# own defaults, so each value is written once.
RECIPE_FIELDS = ("solve_rate_over", "tent_floor", "div_mode", "teacher_format", "student_format", "select_key",
                 "select_scope", "warmup_steps", "start_pool")


RECIPES = {
    "code": {k: getattr(Config, k) for k in RECIPE_FIELDS},
    "paper": dict(solve_rate_over="group", tent_floor="group", div_mode="nearest", teacher_format="tags",
                  student_format="boxed", select_key="total", select_scope="step", warmup_steps=20,
                  start_pool="seed"),
}


# What each field may be, written once, next to the fields; cli.table_errors applies them and names the
# flag in each message. A bound is ">= x", "> x" or an interval "[a, b]", "(a, b]", "[a, b)".
CHOICES = dict(
    recipe=tuple(RECIPES), solve_rate_over=("parsed", "group"), tent_floor=("band", "group"),
    div_mode=("topk", "nearest"), teacher_format=("think", "tags"), student_format=("final_line", "boxed"),
    select_key=("combined", "total"), select_scope=("round", "step"), start_pool=("grow", "seed"),
    loss_agg=("token", "sequence", "role", "constant"), div_embed=("center", "raw"), dtype=("auto", "bf16", "fp32"),
    engine=("auto", *engines.ENGINES), device=("auto", "cuda", "cpu"), report_to=("none", "tensorboard", "wandb"),
    attn=("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"))


BOUNDS = {
    **dict.fromkeys(("teacher_group", "student_group"), ">= 2"),  # a group of one has no variance
    **dict.fromkeys(("n_refs", "rounds_per_step", "updates_per_rollout", "steps", "save_every", "len_cap", "div_topk",
                     "gen_batch", "train_micro_batch", "logprob_chunk", "init_pool_max_rounds", "dist_timeout",
                     "nonfinite_stop"), ">= 1"),
    **dict.fromkeys(("teacher_max_new_tokens", "student_max_new_tokens"), "[1, 131072]"),  # no model writes more
    **dict.fromkeys(("w_solv", "w_div", "w_len", "w_teacher_format", "w_correct", "w_student_format", "beta",
                     "clip_eps", "lr", "init_pool_size", "warmup_steps", "max_grad_norm", "top_k", "weight_decay",
                     "init_pool_min_chars", "kv_cache_gib"), ">= 0"),
    "threads": "[0, 1024]",
    "adv_eps": "> 0",  # the advantage divides by std + adv_eps
    **dict.fromkeys(("band_lo", "band_hi"), "[0, 1]"),
    **dict.fromkeys(("top_p", "select_teacher_frac", "select_student_frac", "vllm_gpu_memory"), "(0, 1]"),
    "temperature": "> 0",  # log-probs are divided by it
    "seed": "[0, 4294967296)",  # what numpy accepts
}


# A flag that only acts under another setting: typing it without that setting is refused, not ignored.
NEEDS = {"select_teacher_frac": ("select_scope", "step"), "select_student_frac": ("select_scope", "step"),
         "div_topk": ("div_mode", "topk"), "init_pool_size": ("start_pool", "grow"),
         "init_pool_max_rounds": ("start_pool", "grow"), "init_pool_min_chars": ("start_pool", "grow")}


def config_rules(cfg: Config, given: Optional[dict] = None) -> list:
    """The rules that tie fields together, one message each."""
    errors = []
    if cfg.band_lo > cfg.band_hi:
        errors.append(f"need band_lo <= band_hi, got {cfg.band_lo}, {cfg.band_hi}")
    if not cfg.seed_problem.strip():
        errors.append("--seed_problem is blank: the pool needs one problem to grow from")
    if cfg.start_pool == "seed" and cfg.init_pool:
        errors.append(f"--init_pool {cfg.init_pool} loads a starting pool, but --start_pool is 'seed' "
                      f"(recipe {cfg.recipe!r}): pass --start_pool grow to use the file")
    for name, (other, needed) in NEEDS.items():
        if given and name in given and getattr(cfg, other) != needed:
            errors.append(f"--{name} has no effect with --{other} {getattr(cfg, other)} (recipe {cfg.recipe!r}); "
                          f"pass --{other} {needed} as well, or drop --{name}")
    return errors


# ================================================================================================
# 2. Prompts and parsing
# ================================================================================================
# Our wording of the paper's instructions. Everything goes in the user turn: Gemma has no system
# role, and one code path for all models keeps forks simple.


TEACHER_PROMPT = """Here is a maths problem:

{problem}

Write a new maths problem that is conceptually different from this one: it should need different \
ideas to solve, not just new numbers. Its answer must be a number or a mathematical expression.

First, inside <think>...</think>, explain how your problem differs conceptually from the one above. \
Then write your problem inside <problem>...</problem>. Finally, list at most three maths concepts \
needed to solve it, comma separated, inside <concepts>...</concepts>."""


STUDENT_PROMPT = """Solve the following maths problem. Reason step by step, and finish with a final \
line of exactly this form:
Therefore, the final answer is: $\\boxed{{ANSWER}}$
where ANSWER is your final answer.

Problem: {problem}"""


FINAL_LINE_RE = re.compile(r"^Therefore, the final answer is: \$\\boxed\{.+\}\$\.?$")


def teacher_prompt(problem: str) -> str:
    return TEACHER_PROMPT.format(problem=problem)


def student_prompt(problem: str) -> str:
    return STUDENT_PROMPT.format(problem=problem)


def chat(tokenizer, user_text: str) -> str:
    """The chat-formatted prompt string (user turn only, generation prompt appended)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                         add_generation_prompt=True)


def _tag(text: str, name: str) -> Optional[str]:
    """Content of the first <name>...</name>, tags in any case (`<Problem>`, `<THINK>`), as the authors match."""
    m = re.search(rf"<{name}>(.*?)</{name}>", text, re.DOTALL | re.IGNORECASE)
    return m.group(1) if m else None


@dataclass
class TeacherOutput:
    problem: Optional[str]  # text inside <problem>, stripped; None if absent
    concepts: list  # items of <concepts>, stripped
    has_think: bool  # a <think>...</think> block is present (format reward)
    legal: bool  # usable as a problem (see parse_teacher)


def parse_teacher(text: str) -> TeacherOutput:
    """Legal = non-empty <problem> of >= 10 chars (not just dots) and a one-line <concepts> list of
    1 to 3 comma-separated items, at least one of them >= 10 chars. As in the authors' parser, empty
    items count towards the 3 (`a, b, c,` is four items) and a line break of any kind (\\n or \\r)
    inside the stripped list makes it illegal."""
    problem = _tag(text, "problem")
    problem = problem.strip() if problem is not None else None
    raw_concepts = _tag(text, "concepts")
    concepts = []
    concepts_ok = False
    if raw_concepts is not None and len(raw_concepts.strip().splitlines()) == 1:
        items = [c.strip() for c in raw_concepts.split(",")]  # empty items kept: they count
        concepts = [c for c in items if c]
        concepts_ok = len(items) <= 3 and any(len(c) >= 10 for c in items)
    problem_ok = problem is not None and len(problem) >= 10 and problem.strip(". \u2026") != ""
    return TeacherOutput(problem, concepts, _tag(text, "think") is not None, problem_ok and concepts_ok)


def parse_candidate(text: str, cfg: Config) -> TeacherOutput:
    """parse_teacher, except with --random_init, where every output counts as a legal problem so that
    benchmarks of random weights run the student phase at full size."""
    if cfg.random_init:
        return TeacherOutput(text.strip() or "?", ["random weights"], False, True)
    return parse_teacher(text)


def has_final_line(solution: str) -> bool:
    """Student format: the last non-empty line is the asked 'Therefore, the final answer is' line."""
    lines = [ln.strip() for ln in solution.strip().splitlines() if ln.strip()]
    return bool(lines) and FINAL_LINE_RE.match(lines[-1]) is not None


def teacher_format_reward(parsed: TeacherOutput, mode: str) -> float:
    """R_fmt (teacher). code ("think"): 1 when a <think> block is present. paper ("tags"): 1 when the
    problem and concepts tags are valid, which every legal output has (illegal ones get no reward at all)."""
    return float(parsed.has_think if mode == "think" else parsed.legal)


def student_format_reward(solution: str, mode: str) -> float:
    """R_fmt (student). code ("final_line"): 1 when the last line is the asked final-answer line.
    paper ("boxed"): 1 when the solution holds a complete \\boxed{} answer anywhere."""
    return float(has_final_line(solution) if mode == "final_line" else extract_boxed(solution) is not None)


# ================================================================================================
# 3. Sampling and the embedding
# ================================================================================================
# HF model.generate samples both roles (engines.HFEngine; faster engines that sample the same distribution
# sit behind --engine). Every sequence has its own seed, so where and with what it is batched changes nothing.


@dataclass
class Completion:
    prompt_ids: list  # prompt tokens (chat-formatted)
    ids: list  # completion tokens up to and including the first EOS (all of them if truncated)
    text: str  # decoded completion, special tokens dropped
    truncated: bool  # hit max_new_tokens before any EOS


def eos_token_ids(model, tokenizer) -> list:
    """Every token that ends a turn: chat models stop on an end-of-turn token, not only on EOS."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def cut_at_eos(ids: list, eos_ids: list) -> tuple:
    """(ids up to and including the first EOS, truncated?). The mask comes from here, never from pad ids:
    many tokenizers use EOS as pad, so `ids != pad` would drop the EOS the model must learn to emit."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1], False
    return ids, True


def pad_batch(seqs: list, pad_id: int, left: bool = False) -> tuple:
    """(ids, attention mask), both (B, L), the mask built from lengths (a pad id can be a real token).
    Left padding for generation: every prompt ends where sampling starts. Right padding for forward
    passes: real tokens keep positions 0..n-1 whatever else is in the batch."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, span] = torch.tensor(s, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def round_seed(seed: int, step: int, rnd: int) -> int:
    """The seed of one round's references: a function of (seed, step, round) alone, so the round draws the
    same whichever rank plays it and however many ranks there are, and a resume needs no RNG state."""
    return int(np.random.SeedSequence([seed, step, rnd]).generate_state(1)[0])


def sample_seed(seed: int, step: int, rnd: int, role: int, i: int, j: int = 0) -> int:
    """The seed of one sampled sequence (role 0: teacher output i; 1: student solution j of candidate i).
    Each sequence draws from its own stream (engines.seeded_sampler), so a step's one big generation call
    samples what per-round calls would, on any number of ranks. Step 0: the starting pool."""
    return int(np.random.SeedSequence([seed, step, rnd, role, i, j]).generate_state(1, np.uint64)[0] >> 1)


def sampling(cfg: Config) -> engines.Sampling:
    """Both roles sample at the training temperature, top-k and top-p; log-probs are taken at the same T."""
    return engines.Sampling(cfg.temperature, cfg.top_k, cfg.top_p)


def generate(engine, tokenizer, prompts: list, max_new_tokens: int, sampling: engines.Sampling, seeds: list,
             desc: str = "") -> list:
    """One Completion per chat-formatted prompt. The engine (engines.py; HFEngine runs HF model.generate)
    returns raw token ids; the completion is cut at the first of the model's EOS ids, and its mask comes
    from there. seeds: one per prompt (sample_seed)."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]  # the template has BOS
    out = []
    for prompt_ids, gen in zip(encoded, engine.generate(encoded, max_new_tokens, sampling, seeds, desc)):
        ids, truncated = cut_at_eos(gen, engine.eos_ids)
        out.append(Completion(prompt_ids, ids, tokenizer.decode(ids, skip_special_tokens=True), truncated))
    return out


@torch.no_grad()


def embed_texts(model, tokenizer, texts: list, batch_size: int = 64, desc: str = "") -> torch.Tensor:
    """Diversity embedding: the last hidden layer mean-pooled over the text's tokens (no chat
    template, padding excluded), fp32 on the CPU, (n, d). Normalisation happens when comparing."""
    device, out = next(model.parameters()).device, []
    for i in engines.progress_range(0, len(texts), batch_size, desc):  # a bar for long lists (--init_pool)
        enc = [tokenizer(t, add_special_tokens=True)["input_ids"] or [tokenizer.pad_token_id]
               for t in texts[i: i + batch_size]]
        ids, mask = pad_batch(enc, tokenizer.pad_token_id)  # (b, L) each
        h = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state  # (b, L, d)
        m = mask.to(device).unsqueeze(-1).to(h.dtype)  # (b, L, 1)
        out.append(((h * m).sum(1) / m.sum(1)).float().cpu())  # (b, d)
    return torch.cat(out) if out else torch.zeros(0, 0)


# ================================================================================================
# 4. The answer vote
# ================================================================================================
# The vote key (checker.normalize_answer) is string work only, cheap and deterministic: `1/2`, `\dfrac12`
# and `0.5` land on one key (an exact fraction), a trailing unit word or `\text{}` goes, `x = 5` meets `5`,
# and an answer too long to be real gets no key. A student's answer is its last \boxed{} (final_answer).
# The machinery, and the evaluation checker built on the same clean-up, live in checker.py.


def majority_vote(answers: list, over: str = "parsed") -> tuple:
    """Pseudo-label by majority: the most common parsed answer (ties: the earliest sampled).

    code  (over="parsed"): s = count(majority) / #parsed; unparsed answers (None) neither vote nor count.
    paper (over="group", Eq. 1): s = count(majority) / G; unparsed answers count as disagreeing.
    Returns (majority or None, solve rate s, #parsed); s = 0 when nothing parsed.
    """
    parsed = [a for a in answers if a is not None]
    if not parsed:
        return None, 0.0, 0
    counts = Counter(parsed)
    best = max(counts.values())
    majority = next(a for a in parsed if counts[a] == best)  # first sampled among the tied
    return majority, best / len(parsed if over == "parsed" else answers), len(parsed)


# ================================================================================================
# 5. Rewards
# ================================================================================================


def tent_floor(group: int, lo: float, hi: float, rule: str = "band") -> float:
    """The tent's value at the band edges.

    code  (rule="band"):  y_min = 1 / |{k/G : k = 1..G, lo <= k/G <= hi}|; with G = 8 and [0.5, 0.9] the
                           reachable rates are 4/8..7/8, so y_min = 1/4.
    paper (rule="group"): y_min = 1/G = 1/8.
    """
    if rule == "group":
        return 1.0 / group
    n = sum(1 for k in range(1, group + 1) if in_band(k / group, lo, hi))
    return 1.0 / max(n, 1)


def in_band(s: float, lo: float, hi: float) -> bool:
    """lo <= s <= hi, with a little slack so rates like 9/10 are not lost to rounding."""
    return lo - 1e-9 <= s <= hi + 1e-9


def solvability_reward(s: float, group: int, lo: float, hi: float, rule: str = "band") -> float:
    """R_solv(s) = 1 - (1 - y_min) |s - m| / (m - lo) for lo <= s <= hi, else 0;  m = (lo + hi) / 2.

    y_min = tent_floor: code 1/#{k/G in band}; paper (Eq. 2, eta = (1 - 1/G)/(m - lo)) 1/G.
    A tent on the difficulty band: problems the student solves about m of the time score 1, ones it
    always or rarely agrees on score 0, so the teacher is pushed to the edge of the student's ability.
    """
    if not in_band(s, lo, hi):
        return 0.0
    m = (lo + hi) / 2
    if m - lo < 1e-12:  # a zero-width band: any rate in it is the peak
        return 1.0
    return 1.0 - (1.0 - tent_floor(group, lo, hi, rule)) * abs(s - m) / (m - lo)


def length_reward(solution_lengths: list, cap: int) -> float:
    """R_len = min(mean student completion tokens, cap) / cap (both recipes): longer solutions mean harder problems."""
    if not solution_lengths:
        return 0.0
    return min(float(np.mean(solution_lengths)), cap) / cap


def diversity_rewards(cand: torch.Tensor, pool: torch.Tensor, topk: int, center: bool) -> torch.Tensor:
    """R_div(x) = (1 - mean of the top-k cos(e_x, e_y)) / 2, y over the pool and the other candidates.
    The released code's diversity (recipe code); range [0, 1].

    cand (n, d) and pool (p, d) are raw mean-pooled hidden states. Hidden states of a language model
    are anisotropic: every pair has cosine near 1, so raw cosines barely separate a copy from a new
    problem. With center=True we subtract the mean embedding of everything compared (pool and
    candidates) before normalising, which spreads cosines over [-1, 1]; center=False keeps raw cosines.
    """
    n = cand.shape[0]
    if n == 0:
        return torch.zeros(0)
    allv = torch.cat([pool, cand]).float()  # (p + n, d)
    if center:
        allv = allv - allv.mean(dim=0, keepdim=True)
    allv = F.normalize(allv, dim=-1, eps=1e-12)
    c = allv[pool.shape[0]:]  # (n, d)
    sim = c @ allv.T  # (n, p + n)
    self_idx = torch.arange(n) + pool.shape[0]
    sim[torch.arange(n), self_idx] = -float("inf")  # a candidate is not its own neighbour
    k = min(topk, sim.shape[1] - 1)
    if k <= 0:  # nothing to compare with (empty pool, one candidate): similarity taken as 0
        return torch.full((n,), 0.5)
    top = sim.topk(k, dim=1).values  # (n, k)
    return (1.0 - top.mean(dim=1)) / 2.0


def nearest_distance(cand: torch.Tensor, pool: torch.Tensor, center: bool) -> torch.Tensor:
    """R_div(x) = 1 - max_y cos(e_x, e_y), y over the pool as it was before this step: the cosine
    distance to the single nearest earlier problem (recipe paper, Eq. 4); range [0, 2].

    cand (n, d), pool (p, d): raw mean-pooled hidden states. Candidates of the same step are not compared
    with each other. center as in diversity_rewards (the mean of pool and candidates is subtracted first).
    An empty pool gives 1 (cosine taken as 0).
    """
    n = cand.shape[0]
    if n == 0:
        return torch.zeros(0)
    if pool is None or pool.shape[0] == 0:
        return torch.ones(n)
    allv = torch.cat([pool, cand]).float()  # (p + n, d)
    if center:
        allv = allv - allv.mean(dim=0, keepdim=True)
    allv = F.normalize(allv, dim=-1, eps=1e-12)
    sim = allv[pool.shape[0]:] @ allv[: pool.shape[0]].T  # (n, p)
    return (1.0 - sim.max(dim=1).values).clamp(0.0, 2.0)  # (n,)


def teacher_total(solv: float, div: float, length: float, fmt: float, cfg: "Config") -> float:
    """R_T = w_solv R_solv + w_div R_div + w_len R_len + w_fmt R_format (both recipes; all 0 for an illegal output)."""
    return cfg.w_solv * solv + cfg.w_div * div + cfg.w_len * length + cfg.w_teacher_format * fmt


def student_rewards(answers: list, majority: Optional[str], formats: list, cfg: "Config") -> list:
    """R_S = w_correct [answer == majority] + w_fmt R_fmt, R_fmt from student_format_reward (both recipes)."""
    return [cfg.w_correct * float(majority is not None and a == majority) + cfg.w_student_format * float(f)
            for a, f in zip(answers, formats)]


# ================================================================================================
# 6. One round: teacher, student, scores
# ================================================================================================


@dataclass
class Candidate:
    """One teacher output of a round and everything the round learns about it."""
    group: int  # which reference (teacher group) it came from
    completion: Completion
    parsed: TeacherOutput
    solutions: list = field(default_factory=list)  # G student Completions (legal problems only)
    answers: list = field(default_factory=list)  # normalised final answers, None if unparsed
    majority: Optional[str] = None
    solve_rate: float = 0.0
    n_parsed: int = 0
    solv: float = 0.0
    div: float = 0.0
    length: float = 0.0
    fmt: float = 0.0
    reward: float = 0.0  # R_T
    student_rewards: list = field(default_factory=list)  # R_S per solution
    student_formats: list = field(default_factory=list)  # the format reward of each solution
    rank_key: float = 0.0  # the ranking key (select_key): w_solv R_solv + w_div R_div (code) or R_T (paper)
    embedding: Optional[torch.Tensor] = None  # raw mean-pooled hidden state (d,)

    @property
    def scored(self) -> bool:
        """Has a score: legal, and at least one solution gave a parsed answer (the authors' gating)."""
        return self.parsed.legal and self.n_parsed > 0


def play_rounds(engine, frozen, tokenizer, pool: Pool, rounds_refs: dict, step: int, cfg: Config,
                timers: Counter, pool_before: Optional[torch.Tensor] = None) -> dict:
    """Rounds of self-play in two generation calls: every round's teacher prompts at once, then every legal
    problem's G student prompts at once; then each round is scored on its own. rounds_refs: round -> its
    reference indices into the pool. pool_before: the pool's embeddings at the step's start (div_mode
    nearest). Returns round -> its n_refs * g Candidates, grouped by reference (group = index into refs)."""
    g, G, t0 = cfg.teacher_group, cfg.student_group, time.perf_counter()
    keys = [(rnd, i) for rnd, refs in rounds_refs.items() for i in range(len(refs) * g)]
    outs = generate(engine, tokenizer, [chat(tokenizer, teacher_prompt(pool.problems[rounds_refs[rnd][i // g]]))
                                        for rnd, i in keys], cfg.teacher_max_new_tokens, sampling(cfg),
                    [sample_seed(cfg.seed, step, rnd, 0, i) for rnd, i in keys], "teacher")
    cands = {rnd: [] for rnd in rounds_refs}
    for (rnd, i), o in zip(keys, outs):
        cands[rnd].append(Candidate(i // g, o, parse_candidate(o.text, cfg)))
    legal = [(rnd, i, c) for rnd, cs in cands.items() for i, c in enumerate(cs) if c.parsed.legal]
    t1 = time.perf_counter()
    sols = generate(engine, tokenizer, [chat(tokenizer, student_prompt(c.parsed.problem)) for *_, c in legal for _ in range(G)],
                    cfg.student_max_new_tokens, sampling(cfg),
                    [sample_seed(cfg.seed, step, rnd, 1, i, j) for rnd, i, _ in legal for j in range(G)], "student")
    for k, (_, _, c) in enumerate(legal):
        c.solutions = sols[k * G: (k + 1) * G]
        c.answers = [normalize_answer(final_answer(s.text)) for s in c.solutions]
        if cfg.random_init:  # random weights box nothing: their last words vote, so the student phase trains at full size
            c.answers = [a if a is not None else (s.text.split() or ["?"])[-1] for a, s in zip(c.answers, c.solutions)]
    t2 = time.perf_counter()
    nearest = cfg.div_mode == "nearest" and pool_before is not None
    for rnd, cs in cands.items():
        mine = [c for c in cs if c.parsed.legal]
        if mine and cfg.w_div > 0:
            for c, e in zip(mine, embed_texts(frozen, tokenizer, [c.parsed.problem for c in mine])):
                c.embedding = e
        score_candidates(cs, pool_before if nearest else pool.embeddings, cfg)
    timers["teacher_gen"] += t1 - t0
    timers["student_gen"] += t2 - t1
    timers["teacher_tokens"] += sum(len(o.ids) for o in outs)
    timers["student_tokens"] += sum(len(s.ids) for s in sols)
    timers["scoring"] += time.perf_counter() - t2
    return cands


def score_candidates(cands: list, pool_emb: Optional[torch.Tensor], cfg: Config) -> None:
    """Fill every reward of a round's candidates (in place). Illegal candidates keep all zeros.
    pool_emb: what diversity compares with (div_mode topk: the pool now; nearest: the pool before the step).
    A legal problem with no parsed answer gets length 0 (its solutions may ramble to the budget; that
    must not pay the teacher) and is never selected (`scored` is False)."""
    legal = [c for c in cands if c.parsed.legal]
    for c in legal:
        c.majority, c.solve_rate, c.n_parsed = majority_vote(c.answers, cfg.solve_rate_over)
        c.solv = solvability_reward(c.solve_rate, cfg.student_group, cfg.band_lo, cfg.band_hi, cfg.tent_floor)
        c.length = length_reward([len(s.ids) for s in c.solutions], cfg.len_cap) if c.n_parsed else 0.0  # its own
        c.fmt = teacher_format_reward(c.parsed, cfg.teacher_format)
        c.student_formats = [student_format_reward(s.text, cfg.student_format) for s in c.solutions]
        c.student_rewards = student_rewards(c.answers, c.majority, c.student_formats, cfg)
    if legal and cfg.w_div > 0:
        emb = torch.stack([c.embedding for c in legal])  # (n, d)
        center = cfg.div_embed == "center"
        divs = (nearest_distance(emb, pool_emb, center) if cfg.div_mode == "nearest"
                else diversity_rewards(emb, pool_emb, cfg.div_topk, center))
        for c, d in zip(legal, divs.tolist()):
            c.div = d
    for c in legal:
        c.reward = teacher_total(c.solv, c.div, c.length, c.fmt, cfg)
        c.rank_key = c.reward if cfg.select_key == "total" else cfg.w_solv * c.solv + cfg.w_div * c.div


# ================================================================================================
# 7. Selection: which groups are trained
# ================================================================================================


def group_spread(rank_key: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """Var of the ranking key within each reference group, over the members that have a score (both
    recipes, as the authors compute it); -1 for a group with none, so it ranks last.
    rank_key, scored: (n_groups, g) -> (n_groups,)."""
    out = np.full(rank_key.shape[0], -1.0)
    for i, (row, ok) in enumerate(zip(rank_key, scored.astype(bool))):
        if ok.any():
            out[i] = row[ok].var()
    return out


def select_teacher_group(rank_key: np.ndarray, scored: np.ndarray) -> int:
    """Recipe code, per round: argmax_j Var{key_i : i in group j, i scored}, the most informative group
    for GRPO (first among ties); groups with no scored member rank last."""
    return int(np.argmax(group_spread(rank_key, scored)))


def select_student_problem(cands: list) -> Optional[int]:
    """Recipe code, per round: argmax_i key_i over the scored candidates (first among ties), or None."""
    ok = [i for i, c in enumerate(cands) if c.scored]
    return max(ok, key=lambda i: cands[i].rank_key) if ok else None


def select_step(rounds_cands: list, g: int, teacher_frac: float, student_frac: float) -> list:
    """Recipe paper, per step: of all K reference groups of the step keep the round(teacher_frac K) with the
    largest Var(key) (as group_spread), and the round(student_frac K) scored problems with the largest key
    (at least one each; ties: the earliest). At the defaults K = 16 x 4 = 64: 32 + 32 groups, 512 sequences.
    Returns, per round, (kept teacher groups, kept candidate indices)."""
    spread, keys = [], []
    for r, cands in enumerate(rounds_cands):
        sp = group_spread(np.array([c.rank_key for c in cands]).reshape(-1, g),
                          np.array([c.scored for c in cands]).reshape(-1, g))
        spread += [(v, r, j) for j, v in enumerate(sp)]
        keys += [(c.rank_key, r, i) for i, c in enumerate(cands) if c.scored]
    n_groups = len(spread)
    top_t = sorted(range(n_groups), key=lambda k: -spread[k][0])[: max(1, round(teacher_frac * n_groups))]
    top_s = sorted(range(len(keys)), key=lambda k: -keys[k][0])[: max(1, round(student_frac * n_groups))]
    chosen = [([], []) for _ in rounds_cands]
    for k in sorted(top_t):
        chosen[spread[k][1]][0].append(spread[k][2])
    for k in sorted(top_s):
        chosen[keys[k][1]][1].append(keys[k][2])
    return chosen


def select_for_training(rounds_cands: list, cfg: Config) -> list:
    """Per round, (teacher groups to train, student candidates to train), by cfg.select_scope."""
    if cfg.select_scope == "step":
        return select_step(rounds_cands, cfg.teacher_group, cfg.select_teacher_frac, cfg.select_student_frac)
    g, chosen = cfg.teacher_group, []
    for cands in rounds_cands:
        group = select_teacher_group(np.array([c.rank_key for c in cands]).reshape(-1, g),
                                     np.array([c.scored for c in cands]).reshape(-1, g))  # (n_refs, g) each
        best = select_student_problem(cands)
        chosen.append(([group], [] if best is None else [best]))
    return chosen


# ================================================================================================
# 8. Advantages and the batch
# ================================================================================================


def group_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """A_i = (R_i - mean(R)) / (std(R) + eps) within each group (rows); std unbiased, as TRL computes it.

    rewards: (n_groups, group_size). A group whose rewards are all equal gets A = 0 (a zero numerator,
    up to rounding, over eps), never NaN.
    """
    mean = rewards.mean(dim=1, keepdim=True)  # (n, 1)
    std = rewards.std(dim=1, keepdim=True)  # (n, 1), needs group_size >= 2 (Config.validate)
    return (rewards - mean) / (std + eps)  # (n, G)


@dataclass
class TrainSeq:
    """One sequence to train on: prompt + completion, a sequence-level advantage, a loss mask."""
    prompt_ids: list
    ids: list  # completion ids (up to and including the first EOS)
    mask: list  # 1 per completion token that carries loss (0: the teacher's <concepts> span)
    advantage: float
    role: str  # "teacher" | "student"
    weight: float = 0.0  # loss weight per token, from the aggregation (set by set_loss_weights)
    old_logp: Optional[torch.Tensor] = None  # (T,) at rollout time, when updates_per_rollout > 1
    ref_logp: Optional[torch.Tensor] = None  # (T,) under the frozen initial model, when beta > 0


def concepts_mask(tokenizer, ids: list) -> list:
    """Loss mask for a teacher completion: 0 on the tokens of `<concepts>...</concepts>`, 1 elsewhere.

    The concepts are bookkeeping for the pool, not something the teacher is rewarded for. Token spans
    come from the character offsets of decoded prefixes (binary search), so any tokenizer works.
    """
    span = re.search(r"<concepts>.*?</concepts>", tokenizer.decode(ids), re.DOTALL | re.IGNORECASE)  # any case, as parse_teacher
    if span is None:
        return [1] * len(ids)
    start, end = span.span()

    def first_token_reaching(char_pos: int) -> int:  # smallest k with len(decode(ids[:k+1])) > char_pos
        lo, hi = 0, len(ids) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(tokenizer.decode(ids[: mid + 1])) > char_pos:
                hi = mid
            else:
                lo = mid + 1
        return lo

    a, b = first_token_reaching(start), first_token_reaching(end - 1)
    return [0 if a <= i <= b else 1 for i in range(len(ids))]


def round_seqs(cands: list, groups: list, students: list, tokenizer, cfg: Config) -> list:
    """TrainSeqs of one round's chosen groups with their advantages: each chosen teacher group whole
    (illegal members train with reward 0), and the G solutions of each chosen problem."""
    g, seqs = cfg.teacher_group, []
    for group in (groups if cfg.train_teacher else []):  # frozen teacher: no teacher groups
        members = cands[group * g: (group + 1) * g]
        adv_t = group_advantages(torch.tensor([[c.reward for c in members]], dtype=torch.float64), cfg.adv_eps)[0]
        seqs += [TrainSeq(c.completion.prompt_ids, c.completion.ids, concepts_mask(tokenizer, c.completion.ids),
                          float(a), "teacher") for c, a in zip(members, adv_t)]
    for i in students:
        c = cands[i]
        adv_s = group_advantages(torch.tensor([c.student_rewards], dtype=torch.float64), cfg.adv_eps)[0]
        seqs += [TrainSeq(s.prompt_ids, s.ids, [1] * len(s.ids), float(a), "student")
                 for s, a in zip(c.solutions, adv_s)]
    return seqs


def training_batch(rounds_cands: list, tokenizer, cfg: Config, mine: Optional[range] = None) -> tuple:
    """Selection and advantages for a step. Returns (the loss's rounds: lists of TrainSeqs, per round
    (chosen teacher groups, chosen candidate indices), and the sequences of the rounds in `mine`: what
    this rank trains; all of them when mine is None). Per-round selection keeps one loss term per round
    (L = mean over rounds, the authors' TRL behaviour); per-step selection is one batch, one token mean
    over all its sequences. Every rank holds every round's scores, so every rank selects the same."""
    chosen = select_for_training(rounds_cands, cfg)
    rounds = [round_seqs(cands, groups, studs, tokenizer, cfg) for cands, (groups, studs) in zip(rounds_cands, chosen)]
    own = [s for r, seqs in enumerate(rounds) if mine is None or r in mine for s in seqs]
    if cfg.select_scope == "step":
        rounds = [[s for r in rounds for s in r]]
    return rounds, chosen, own


# ================================================================================================
# 9. Log-probs and the GRPO loss
# ================================================================================================


def set_loss_weights(rounds: list, agg: str, max_new_tokens: int) -> None:
    """Per-token weights w_i so that L_round = sum_i w_i sum_t m_it l_it, for each aggregation.

    token    (authors, TRL 0.16): w = 1 / (completion tokens of the round), teacher and student pooled
    sequence (original GRPO):     w = 1 / (n_seqs * len_i), every sequence counts the same
    role:                         w = 1 / (n_roles * tokens of the role), teacher and student count the same
    constant (Dr. GRPO):          w = 1 / (n_seqs * max_new_tokens), no length normalisation
    The step loss is the mean over rounds, so every weight is also divided by the number of rounds.
    """
    n_rounds = len(rounds)
    for seqs in rounds:
        n_tok = sum(sum(s.mask) for s in seqs)
        by_role = Counter()
        for s in seqs:
            by_role[s.role] += sum(s.mask)
        for s in seqs:
            if agg == "token":
                w = 1.0 / max(n_tok, 1)
            elif agg == "sequence":
                w = 1.0 / (len(seqs) * max(sum(s.mask), 1))
            elif agg == "role":
                w = 1.0 / (len(by_role) * max(by_role[s.role], 1))
            elif agg == "constant":
                w = 1.0 / (len(seqs) * max_new_tokens)
            else:
                raise ValueError(f"unknown loss_agg {agg!r}")
            s.weight = w / n_rounds


def _lm_head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(lm_head(h) / T)[target] for a chunk of positions. hidden (N, H), targets (N,) -> (N,)."""
    logits = model.get_output_embeddings()(hidden).float()  # (N, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma-2 squashes its logits; skipping this changes every log-prob
        logits = torch.tanh(logits / cap) * cap
    logits = logits / temperature  # log-probs of the distribution we sampled from
    return logits.log_softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)  # (N,)


def sequence_logprobs(model, seqs: list, temperature: float, chunk: int, autocast_dtype=None) -> list:
    """Per-token log-probs of each sequence's completion: a list of (T_i,) tensors.

    Right padding, so positions of real tokens are 0..L-1 whatever the batch (padding invariance).
    The vocabulary projection runs over `chunk` positions at a time and, under autograd, is
    recomputed in backward (checkpoint): a (tokens x 256k) logit tensor is never held whole.
    """
    device = next(model.parameters()).device
    input_ids, attn = pad_batch([s.prompt_ids + s.ids for s in seqs], pad_id=0)  # (B, L) each
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        hidden = model.get_decoder()(input_ids=input_ids.to(device), attention_mask=attn.to(device)).last_hidden_state  # (B, L, H)
    # the token at position t is predicted from the hidden state at t - 1
    rows, cols, tgts = [], [], []
    for row, s in enumerate(seqs):
        p = len(s.prompt_ids)
        cols += list(range(p - 1, p - 1 + len(s.ids)))
        rows += [row] * len(s.ids)
        tgts += s.ids
    h = hidden[torch.tensor(rows), torch.tensor(cols)]  # (N, H), N = all completion tokens
    t = torch.tensor(tgts, device=device)  # (N,)
    parts = []
    for i in range(0, h.shape[0], chunk):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if torch.is_grad_enabled():
                parts.append(torch.utils.checkpoint.checkpoint(
                    _lm_head_logprobs, model, h[i: i + chunk], t[i: i + chunk], temperature, use_reentrant=False))
            else:
                parts.append(_lm_head_logprobs(model, h[i: i + chunk], t[i: i + chunk], temperature))
    flat = torch.cat(parts) if parts else torch.zeros(0, device=device)  # (N,)
    return list(flat.split([len(s.ids) for s in seqs]))


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: Optional[torch.Tensor],
                    advantage: float, clip_eps: float, beta: float) -> tuple:
    """Per-token GRPO loss and k3 KL for one sequence (all (T,)):

        r_t  = exp(logp_t - logp_old_t)
        kl_t = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1
        l_t  = -min(r_t A, clip(r_t, 1 - eps, 1 + eps) A) + beta kl_t
    """
    ratio = torch.exp(logp - old_logp)  # (T,); exactly 1 on the first update of a rollout
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage)  # (T,)
    if ref_logp is None or beta == 0:
        kl = torch.zeros_like(logp)
    else:
        d = ref_logp - logp  # (T,)
        kl = torch.exp(d) - d - 1  # (T,), >= 0, unbiased estimate of KL(pi || pi_ref)
    return -surrogate + beta * kl, kl


def optimise(policy, frozen, optimizer, scheduler, rounds: list, cfg: Config, autocast_dtype,
             guard: Optional[runs.StepGuard] = None, own: Optional[list] = None) -> dict:
    """updates_per_rollout optimiser steps on one batch of rounds. L = mean over rounds of L_round.
    Several ranks: the weights come from all the step's rounds, each rank backpropagates only `own` (its
    rounds' sequences), and the gradients are summed across ranks before the one clip: the sum of the
    ranks' losses is L itself, so the step equals one process's up to float summation order."""
    set_loss_weights(rounds, cfg.loss_agg, max(cfg.teacher_max_new_tokens, cfg.student_max_new_tokens))
    seqs = sorted(own if own is not None else (s for r in rounds for s in r), key=lambda s: -(len(s.prompt_ids) + len(s.ids)))
    trained = any(len(r) for r in rounds)  # the same on every rank: `rounds` holds the whole step's sequences
    batches = [seqs[i: i + cfg.train_micro_batch] for i in range(0, len(seqs), cfg.train_micro_batch)]
    if cfg.fsdp and parallel.active() is not None:  # FSDP gathers in every pass: all ranks run the same number of them
        most = torch.tensor([len(batches)], device=next(policy.parameters()).device)
        parallel.dist_call("all_reduce", most, parallel.active().ReduceOp.MAX)
        batches += [[TrainSeq([0], [0], [0], 0.0, "teacher")] for _ in range(int(most) - len(batches))]  # weight 0
    with torch.no_grad():  # fixed targets of this rollout: reference and (for mu > 1) old log-probs
        for mb in batches:
            if frozen is not None and cfg.beta > 0:
                for s, lp in zip(mb, sequence_logprobs(frozen, mb, cfg.temperature, cfg.logprob_chunk)):
                    s.ref_logp = lp
            if cfg.updates_per_rollout > 1:
                for s, lp in zip(mb, sequence_logprobs(policy, mb, cfg.temperature, cfg.logprob_chunk, autocast_dtype)):
                    s.old_logp = lp
    policy.train()
    stats = Counter()
    for _ in range(cfg.updates_per_rollout):
        optimizer.zero_grad(set_to_none=True)
        for mb in batches:
            logps = sequence_logprobs(policy, mb, cfg.temperature, cfg.logprob_chunk, autocast_dtype)
            loss = 0.0
            for s, lp in zip(mb, logps):
                old = s.old_logp if s.old_logp is not None else lp.detach()
                l_t, kl_t = grpo_token_loss(lp, old, s.ref_logp, s.advantage, cfg.clip_eps, cfg.beta)  # (T,)
                m = torch.tensor(s.mask, dtype=l_t.dtype, device=l_t.device)  # (T,)
                loss = loss + s.weight * (l_t * m).sum()
                with torch.no_grad():
                    stats["kl_sum"] += float((kl_t * m).sum())
                    stats["tokens"] += float(m.sum())
                    clipped = ((torch.exp(lp - old) - 1).abs() > cfg.clip_eps).float()  # (T,)
                    stats["clipped"] += float((clipped * m).sum())
            loss.backward()
            stats["loss"] += float(loss.detach())
        if not trained:  # nothing selected anywhere: gradients stay None as in one process, so AdamW moves nothing
            grad_norm = torch.zeros(())
        elif cfg.fsdp:  # FSDP has reduce-scattered (summed) the sharded ones; the whole ones are summed here
            from torch.distributed.tensor import DTensor
            parallel.sum_gradients([p for p in policy.parameters() if not isinstance(p, DTensor)])
            grad_norm = parallel.clip_gradients(list(policy.parameters()), cfg.max_grad_norm)
        else:
            parallel.sum_gradients(list(policy.parameters()))
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        if not math.isfinite(float(grad_norm)):  # a diverged gradient is never applied: counted, and train stops
            stats["nonfinite_skipped"] += 1      # after --nonfinite_stop such steps in a row
            optimizer.zero_grad(set_to_none=True)
            continue
        if guard is not None:
            guard.begin()  # from the first weight update until the step is recorded, Ctrl-C waits
        optimizer.step()
        scheduler.step()
        stats["grad_norm"] += float(grad_norm)
    optimizer.zero_grad(set_to_none=True)  # free gradient memory before the next generation phase
    policy.eval()
    if parallel.active() is not None:  # the step's loss, KL and clip share over every rank's tokens
        keys = ("loss", "kl_sum", "tokens", "clipped")
        total = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=next(policy.parameters()).device)
        parallel.dist_call("all_reduce", total)
        for k, v in zip(keys, total.tolist()):
            stats[k] = v  # (Counter.update would add)
    n = cfg.updates_per_rollout
    return {"loss": stats["loss"] / n, "kl": stats["kl_sum"] / max(stats["tokens"], 1),
            "clip_frac": stats["clipped"] / max(stats["tokens"], 1), "grad_norm": stats["grad_norm"] / n,
            "lr": scheduler.get_last_lr()[0], "nonfinite_skipped": stats["nonfinite_skipped"]}


# ================================================================================================
# 10. The pool and the starting pool
# ================================================================================================


@dataclass
class Pool:
    """The growing set of problems references are drawn from. It never shrinks."""
    problems: list = field(default_factory=list)
    concepts: list = field(default_factory=list)
    embeddings: Optional[torch.Tensor] = None  # (N, d) raw embeddings; None when diversity is off

    def add(self, problems: list, concepts: list, embeddings: Optional[torch.Tensor]) -> None:
        self.problems += problems
        self.concepts += concepts
        if embeddings is not None:
            self.embeddings = embeddings if self.embeddings is None else torch.cat([self.embeddings, embeddings])

    def truncate(self, n: int) -> None:
        del self.problems[n:], self.concepts[n:]
        if self.embeddings is not None:
            self.embeddings = self.embeddings[:n]

    def state(self) -> dict:
        return {"problems": self.problems, "concepts": self.concepts, "embeddings": self.embeddings}


def add_to_pool(pool: Pool, cands: list, cfg: Config) -> None:
    """Every legal problem of the round joins the pool, whatever its solve rate."""
    legal = [c for c in cands if c.parsed.legal]
    emb = torch.stack([c.embedding for c in legal]) if legal and cfg.w_div > 0 else None
    pool.add([c.parsed.problem for c in legal], [c.parsed.concepts for c in legal], emb)


# a number as a problem may write it: `-4`, `1,000`, `0.5`, `.5`, `3/4`, `\frac{3}{4}`, `\dfrac34`; not part of a
# longer number or a name (`14`, `x2`, `4.5` hold no `4`), but a sentence's full stop may follow (`equals 4.`)
_NUMBER_IN_TEXT = re.compile(r"(?<![\w.])-?(?:\\[dt]?frac\s*(?:\{-?\d+\}|\d)\s*(?:\{-?\d+\}|\d)|\d{1,3}(?:,\d{3})+(?:\.\d+)?"
                             r"|\d+(?:\.\d+)?(?:/\d+)?|\.\d+)(?!\d|\.\d)")


def states_answer(problem: str, majority: str) -> bool:
    """Does the problem already state its (normalised) majority answer? Any number written in the problem
    whose vote key equals the majority counts (`1,000` for 1000, `\\frac12` or `0.5` for 1/2), wherever it
    stands, also before a full stop or comma; other answers count when they appear as a whole word."""
    for m in _NUMBER_IN_TEXT.finditer(problem):
        if normalize_answer(m.group(0)) == majority:
            return True
    return re.search(rf"(?<![\w.]){re.escape(majority)}(?!\w|\.\w)", problem) is not None


def starting_pool_filter(c: Candidate, cfg: Config) -> bool:
    """The authors' filter for the starting pool: in the band, a majority answer with a digit, a problem
    of 30+ characters with no tags that does not state its own answer."""
    return (c.parsed.legal and c.majority is not None
            and in_band(c.solve_rate, cfg.band_lo, cfg.band_hi)
            and any(ch.isdigit() for ch in c.majority)
            and len(c.parsed.problem) >= cfg.init_pool_min_chars
            and re.search(r"</?[A-Za-z][\w-]*(\s[^<>]*)?/?>", c.parsed.problem) is None
            and not states_answer(c.parsed.problem, c.majority))


def grow_starting_pool(engine, frozen, tokenizer, cfg: Config, log, rows: Optional[list] = None) -> Pool:
    """Before RL, grow the pool from the seed problem with the untrained model: the same teacher and
    student steps, keeping only in-band problems that pass starting_pool_filter. rows: a starting pool
    given instead (--init_pool, read once by runs.Run). Either way it is saved as OUT/init_pool.jsonl."""
    pool = Pool()
    seed_emb = embed_texts(frozen, tokenizer, [cfg.seed_problem]) if cfg.w_div > 0 else None
    pool.add([cfg.seed_problem], [[]], seed_emb)
    if rows:  # a saved pool: one JSON object with a "problem" (and "concepts") per line
        emb = (embed_texts(frozen, tokenizer, [r["problem"] for r in rows], desc="embedding --init_pool")
               if cfg.w_div > 0 else None)
        pool.add([r["problem"] for r in rows], [r.get("concepts", []) for r in rows], emb)
        log(f"starting pool: {len(rows)} problems from {cfg.init_pool}")
        if parallel.rank() == 0:  # resume reads the pool from the checkpoint; this copy records what was used
            with runs.open_out(os.path.join(cfg.out, "init_pool.jsonl")) as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        return pool
    if cfg.init_pool_size == 0 or cfg.start_pool == "seed":  # recipe paper starts RL from the seed alone
        return pool
    kept, timers = [], Counter()
    bar = engines.progress(total=cfg.init_pool_size, desc="starting pool")
    for r in range(cfg.init_pool_max_rounds):
        if len(kept) >= cfg.init_pool_size:
            break
        refs = [random.randrange(len(pool.problems)) for _ in range(cfg.n_refs)]
        cands = [c for c in play_rounds(engine, frozen, tokenizer, pool, {r: refs}, 0, cfg, timers)[r]
                 if starting_pool_filter(c, cfg)][: cfg.init_pool_size - len(kept)]
        add_to_pool(pool, cands, cfg)
        kept += cands
        bar.update(len(cands))
    bar.close()
    log(f"starting pool: {len(kept)} of {cfg.init_pool_size} in-band problems after {r + 1} rounds"
        + ("" if len(kept) >= cfg.init_pool_size else " (stopped at --init_pool_max_rounds)"))
    if parallel.rank() != 0:  # every rank grows the same pool (same seed); rank 0 alone writes it
        return pool
    with runs.open_out(os.path.join(cfg.out, "init_pool.jsonl")) as f:
        for c in kept:
            f.write(json.dumps({"problem": c.parsed.problem, "concepts": c.parsed.concepts,
                                "solve_rate": c.solve_rate, "majority": c.majority}) + "\n")
    return pool


# ================================================================================================
# 11. The loop
# ================================================================================================
PROMPTS = (teacher_prompt, student_prompt)  # what the built-in tiny and toy models learn to answer (tiny.py)


def load_model(name_or_path: str, **kwargs):
    """models.load_model: (model, tokenizer) on the device, in eval mode; builds --model tiny or toy on PROMPTS."""
    return models.load_model(name_or_path, prompts=PROMPTS, **kwargs)


def load_models(cfg: Config, resume_from: Optional[str]) -> tuple:
    """(policy, frozen, sampler, tokenizer). policy: fp32 master weights (at lr 3e-7 a bf16 weight cannot
    move), from the checkpoint on resume. frozen: the initial weights in the compute dtype, never trained,
    for the KL term and the diversity embedding (None when neither is on). sampler: what generates, the
    policy itself in fp32, else a compute-dtype copy refreshed after every update."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    load = dict(device=cfg.device, attn=cfg.attn, seed=cfg.seed)
    policy, tokenizer = load_model(resume_from or cfg.model, dtype="fp32",
                                   random_init=cfg.random_init and not resume_from, **load)
    frozen = None
    if cfg.beta > 0 or cfg.w_div > 0:
        frozen, _ = load_model(cfg.model, dtype=cfg.dtype, random_init=cfg.random_init, **load)
        frozen.requires_grad_(False)
    device = models.pick_device(cfg.device)
    cdtype = models.compute_dtype(device, cfg.dtype)
    sampler = policy
    vllm = cfg.engine == "vllm" or (cfg.engine == "auto" and device.type == "cuda" and engines.vllm_available())
    if (cdtype != torch.float32 or cfg.fsdp) and not vllm:  # --fsdp: the policy is sharded; generation needs it whole
        import copy
        sampler = copy.deepcopy(policy).to(cdtype).requires_grad_(False)
    if device.type == "cuda" and cfg.grad_ckpt:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.fsdp:
        parallel.shard_policy(policy)
    return policy, frozen, sampler, tokenizer


def make_optimizer(policy, cfg: Config) -> tuple:
    """AdamW, and a linear warm-up reaching lr at step `warmup_steps`, then constant (lr/warmup on the first
    step, not 0, so the first step's rollouts are not thrown away)."""
    groups = list(policy.parameters())
    if cfg.fsdp:  # sharded and whole parameters in separate groups: AdamW's foreach kernels take no mix
        from torch.distributed.tensor import DTensor
        groups = [{"params": [p for p in groups if isinstance(p, DTensor) == d]} for d in (True, False)]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    return optimizer, scheduler


def train(cfg: Config) -> str:
    """The whole method (the paper's Algorithm 1). cfg: a validated Config (config_from_args). Returns the
    path of the final checkpoint."""
    run = runs.Run(cfg, PROMPTS)  # processes, --out and the checkpoint to resume: checked before loading
    models.check_memory(cfg, run.log, run.world)  # the memory plan, from the model's config; refused if it cannot fit
    policy, frozen, sampler, tokenizer = load_models(cfg, run.resume_from)
    optimizer, scheduler = make_optimizer(policy, cfg)
    device = models.pick_device(cfg.device)
    cdtype = models.compute_dtype(device, cfg.dtype)
    autocast_dtype = cdtype if cdtype != torch.float32 else None
    eos_ids = eos_token_ids(sampler, tokenizer)
    try:
        engine = engines.make_engine(
            cfg.engine, sampler, eos_ids, tokenizer.pad_token_id, cfg.gen_batch, cfg.kv_cache_gib, run.log,
            path=cfg.model if cfg.random_init else models.resolve_model(cfg.model, PROMPTS), seed=cfg.seed,
            max_model_len=models.PLAN_PROMPT_TOKENS + max(cfg.teacher_max_new_tokens, cfg.student_max_new_tokens),
            gpu_memory=cfg.vllm_gpu_memory, compile_width=models.PLAN_PROMPT_TOKENS if cfg.compile else 0,
            max_new_tokens=max(cfg.teacher_max_new_tokens, cfg.student_max_new_tokens))
    except ValueError as err:  # the continuous engine would drop Gemma-2's soft-capping
        raise SystemExit(str(err))
    run.log(f"model {cfg.model}: {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters on {device}, "
            f"compute {cdtype}, reference model {'yes' if frozen is not None else 'no'}, engine {engine.name} ({engine.why})")

    engine.update(policy)  # the engine samples from the policy's weights (vLLM: pushed into its own copy)
    set_seed(cfg.seed)  # after loading: building the tiny model or initialising weights draws random numbers
    start, saved_pool = run.start(policy, optimizer, scheduler)  # on resume: optimizer, scheduler, RNG
    if saved_pool is not None:
        pool = Pool(**saved_pool)
    else:  # every rank grew it alike; rank 0's copy makes the pools identical to the bit
        pool = Pool(**parallel.broadcast(grow_starting_pool(engine, frozen, tokenizer, cfg, run.log, run.init_pool).state()))

    diverged = 0  # steps in a row whose gradient was not finite
    with run.interrupts(start, policy, sampler, tokenizer, optimizer, scheduler, pool) as guard:
        for step in range(start + 1, cfg.steps + 1):
            timers, t_step = Counter(), time.perf_counter()
            # Every round of the step draws its references from, and compares diversity with, the pool as
            # it stood at the START of the step; the step's legal problems join it at the end, in round
            # order. The authors' released code grows the pool after every round (of every process); here
            # the pool grows once per step, as in the paper's Algorithm 1, so a round does not depend on
            # which rank played the rounds before it, and 1 and N processes run the same rollouts. Recipe
            # code's diversity is thus against the step-start pool plus the round's own candidates; recipe
            # paper's "pool before this step" is the same pool.
            rounds_refs = []
            for rnd in range(cfg.rounds_per_step):
                set_seed(round_seed(cfg.seed, step, rnd))  # references: (seed, step, round) alone
                rounds_refs.append([random.randrange(len(pool.problems)) for _ in range(cfg.n_refs)])
            engine.wake()
            played = play_rounds(engine, frozen, tokenizer, pool, {rnd: rounds_refs[rnd] for rnd in run.mine}, step,
                                 cfg, timers, pool.embeddings)  # this rank's share of the rounds
            engine.sleep()  # generation memory goes back for training
            rounds_cands = parallel.share_rounds(played, cfg.rounds_per_step)  # every round, on every rank
            for cands in rounds_cands:
                add_to_pool(pool, cands, cfg)

            rounds, chosen, own = training_batch(rounds_cands, tokenizer, cfg, run.mine)  # selection, advantages
            t0 = time.perf_counter()
            update = optimise(policy, frozen, optimizer, scheduler, rounds, cfg, autocast_dtype, guard, own)
            diverged = diverged + 1 if update["nonfinite_skipped"] == cfg.updates_per_rollout else 0
            if diverged:
                run.log(f"step {step}: the gradient is not finite (NaN or inf); the update was skipped")
            if diverged >= cfg.nonfinite_stop:
                raise SystemExit(f"{diverged} steps in a row had a gradient that is not finite: training has diverged "
                                 f"at --lr {cfg.lr}. Start a new --out with a smaller --lr (the newest checkpoint, "
                                 f"{runs.latest_checkpoint(cfg.out)}, holds the last weights that were finite).")
            engine.update(policy)  # the next step samples from the updated weights
            timers["train"] += time.perf_counter() - t0
            timers["step"] = time.perf_counter() - t_step

            rows = [row for rnd, (refs, cands, (groups, studs)) in enumerate(zip(rounds_refs, rounds_cands, chosen))
                    for row in runs.problem_rows(step, rnd, [pool.problems[r] for r in refs], cands,
                                            groups if cfg.train_teacher else [], studs)]
            run.log_step(step, runs.step_metrics(step, rounds_cands, rounds, chosen, pool, cfg, update, timers), rows,
                         rounds_cands)
            run.end_step(step)  # what Ctrl-C saves from now; a checkpoint every --save_every
    return run.finish()


# ================================================================================================
# 12. main()
# ================================================================================================


def config_from_args(argv: Optional[list] = None) -> Config:
    """The Config of a command line (cli.config_from_args: flags > small-model defaults > recipe > defaults)."""
    return cli.config_from_args(argv, Config, RECIPES, RECIPE_FIELDS, SMALL_MODEL_DEFAULTS)


def main(argv: Optional[list] = None) -> None:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation
    if parallel.dist_env()[0]:  # under torchrun: one set of progress bars (rank 0's); the bars import tqdm.auto.tqdm
        import tqdm.auto

        class Quiet(tqdm.auto.tqdm):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, "disable": True})
        tqdm.auto.tqdm = Quiet
    cfg = config_from_args(argv)
    old_term = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM (schedulers, torchrun) = Ctrl-C
    try:
        train(cfg)
    except KeyboardInterrupt:  # before the first step (loading, starting pool): nothing of this start is saved
        raise SystemExit(f"\ninterrupted before the first step ended: {runs.next_command(cfg.out)}") from None
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise SystemExit(f"disk full while writing {err.filename or cfg.out} ({err.strerror}). Free some space, "
                         f"then {runs.next_command(cfg.out)}") from None
    finally:
        signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    status = 0
    try:
        main()
    except OSError as err:  # a model that cannot load: one clear line, not a traceback
        status = f"opensir.py: {err}"
    except SystemExit as err:
        status = err.code
    parallel.exit_process(status)  # under torchrun: skip the teardown, which can abort a finished run
    raise SystemExit(status)
