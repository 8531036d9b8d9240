"""OpenSIR: Open-Ended Self-Improving Reasoner, in one file.

Kwan, Ong Jun Leang, Vougiouklis, Pan, Valentino, Minervini. arXiv 2511.00602 (2025).

One model plays two roles. As *teacher* it reads a problem from a growing pool and writes a new,
conceptually different one. As *student* it solves each new problem G times; the most common final
answer is the pseudo-label and the share of answers that agree with it is the problem's solve rate.
Both roles are trained together with GRPO on rewards the model computes itself: no labels.
Two variants, one flag apart (`--recipe`, see RECIPES): `code`, the authors' released code (default),
and `paper`, the equations of the paper's later text (v3/v4).

Read top to bottom; the sections follow one round of the algorithm:
  1. config                      6. scoring a round (rewards -> selection -> pool)
  2. prompts and parsing         7. advantages
  3. answers (extract, vote key)  8. log-probs and the GRPO loss
  4. rewards                     9. models, pool, checkpoints
  5. rollout (teacher, student) 10. the loop and main()
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from checker import extract_boxed, final_answer, normalize_answer

# ================================================================================================
# 1. Config
# ================================================================================================


@dataclass
class Config:
    """Every constant of the method. Defaults are recipe `code`: the authors' released config for
    Llama-3.2-3B-Instruct (RECIPES holds the paper's later variant)."""

    # run
    recipe: str = "code"  # preset applied under your flags: "code" (authors' released code) or "paper" (v3/v4 text); see RECIPES
    model: str = "tiny"  # short name (see MODELS), hub id, local path, or "tiny" (built in-process)
    out: str = "runs/opensir"  # output directory: checkpoints, metrics.jsonl, problems.jsonl
    resume: bool = False  # continue from the latest checkpoint in --out
    resume_from: str = ""  # continue from this checkpoint of --out (an older one, when the newest is damaged)
    seed: int = 0  # seeds python, numpy and torch
    steps: int = 200  # optimisation steps
    save_every: int = 25  # checkpoint every N steps (and at the end)
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
    random_init: bool = False  # random weights from the architecture in MODELS (no download)
    engine: str = "auto"  # "generate" (HF, padded batches), "continuous" (paged KV cache); "auto": AUTO_ENGINE by device
    kv_cache_gib: float = 0.0  # cap on the continuous engine's KV cache in GiB (0: sized from free memory)
    # several processes (torchrun --nproc_per_node N): rounds of a step shared out across N ranks
    dist_timeout: int = 1800  # seconds a rank waits for the others at a collective before the run stops (a rank that died)
    train_teacher: bool = True  # False: the frozen-teacher ablation (teacher groups get no gradient)
    fsdp: bool = False  # torchrun only: shard fp32 weights, gradients and AdamW state over the ranks (FSDP2); generation and reference stay whole per rank

    def validate(self) -> None:
        """Reject contradictory settings before any model loads."""
        errors = []
        if not 0.0 <= self.band_lo <= self.band_hi <= 1.0:
            errors.append(f"need 0 <= band_lo <= band_hi <= 1, got {self.band_lo}, {self.band_hi}")
        for name in ("teacher_group", "student_group"):
            if getattr(self, name) < 2:
                errors.append(f"--{name} must be >= 2 (a group of one has no variance), got {getattr(self, name)}")
        for name in ("n_refs", "rounds_per_step", "updates_per_rollout", "steps", "save_every",
                     "teacher_max_new_tokens", "student_max_new_tokens", "len_cap", "div_topk",
                     "gen_batch", "train_micro_batch", "logprob_chunk"):
            if getattr(self, name) < 1:
                errors.append(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("w_solv", "w_div", "w_len", "w_teacher_format", "w_correct", "w_student_format",
                     "beta", "clip_eps", "lr", "init_pool_size", "warmup_steps", "max_grad_norm", "threads"):
            if getattr(self, name) < 0:
                errors.append(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            errors.append("--temperature must be > 0 (log-probs are divided by it)")
        if not 0 < self.top_p <= 1:
            errors.append(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.loss_agg not in LOSS_AGGS:
            errors.append(f"--loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")
        errors += recipe_errors(self)  # the recipe fields: RECIPES, below
        if self.div_embed not in ("center", "raw"):
            errors.append(f"--div_embed must be 'center' or 'raw', got {self.div_embed!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            errors.append(f"--dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if self.engine not in ("auto", *ENGINES):
            errors.append(f"--engine must be auto or one of {tuple(ENGINES)}, got {self.engine!r}")
        if self.kv_cache_gib < 0:
            errors.append(f"--kv_cache_gib must be >= 0, got {self.kv_cache_gib}")
        if self.device not in ("auto", "cuda", "cpu"):
            errors.append(f"--device must be auto, cuda or cpu, got {self.device!r}")
        errors += input_errors(self)  # NaN and infinity in any float field, --seed, --seed_problem, --init_pool
        if model_name_error(self.model, self.random_init):
            errors.append(model_name_error(self.model, self.random_init))
        if errors:
            raise ValueError("invalid config:\n  " + "\n  ".join(errors))


LOSS_AGGS = ("token", "sequence", "role", "constant")


def input_errors(cfg: Config) -> list:
    """What no setting may be, whatever the recipe: a float that is NaN or infinite (every comparison
    with NaN is false, so range checks alone let it through), a seed numpy refuses, a blank seed
    problem, a starting-pool file that does not parse."""
    errors = [f"--{f.name} must be a finite number, got {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
              if f.type == "float" and not math.isfinite(getattr(cfg, f.name))]
    if not 0 <= cfg.seed < 2**32:
        errors.append(f"--seed must be in [0, 2**32), got {cfg.seed}")
    for name, lo in (("top_k", 0), ("init_pool_max_rounds", 1), ("init_pool_min_chars", 0)):
        if getattr(cfg, name) < lo:
            errors.append(f"--{name} must be >= {lo}, got {getattr(cfg, name)}")
    if not cfg.seed_problem.strip():
        errors.append("--seed_problem is blank: the pool needs one problem to grow from")
    if cfg.init_pool:
        try:
            read_init_pool(cfg.init_pool)
        except ValueError as err:
            errors.append(str(err))
    return errors

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
RECIPE_CHOICES = dict(solve_rate_over=("parsed", "group"), tent_floor=("band", "group"), div_mode=("topk", "nearest"),
                      teacher_format=("think", "tags"), student_format=("final_line", "boxed"),
                      select_key=("combined", "total"), select_scope=("round", "step"), start_pool=("grow", "seed"))


def recipe_errors(values, given: Optional[dict] = None) -> list:
    """What is wrong with the recipe fields of a config (a Config, or a dict field -> value), one message
    per flag. `given` (the flags the user typed) also catches flags that the chosen settings would ignore."""
    values = values if isinstance(values, dict) else vars(values)
    errors, recipe = [], values["recipe"]
    if recipe not in RECIPES:
        errors.append(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    for name, choices in RECIPE_CHOICES.items():
        if values[name] not in choices:
            errors.append(f"--{name} must be one of {', '.join(choices)}, got {values[name]!r}")
    for name in ("select_teacher_frac", "select_student_frac"):
        if not 0 < values[name] <= 1:  # also false for NaN
            errors.append(f"--{name} must be in (0, 1], got {values[name]}")
    if values["start_pool"] == "seed" and values["init_pool"]:
        errors.append(f"--init_pool {values['init_pool']} loads a starting pool, but --start_pool is 'seed' "
                      f"(recipe {recipe!r}): pass --start_pool grow to use the file")
    ignored = {"select_teacher_frac": ("select_scope", "step"), "select_student_frac": ("select_scope", "step"),
               "div_topk": ("div_mode", "topk"), "init_pool_size": ("start_pool", "grow"),
               "init_pool_max_rounds": ("start_pool", "grow"), "init_pool_min_chars": ("start_pool", "grow")}
    for name, (field_name, needed) in ignored.items():
        if given and name in given and values[field_name] != needed:
            errors.append(f"--{name} has no effect with --{field_name} {values[field_name]} "
                          f"(recipe {recipe!r}); pass --{field_name} {needed} as well, or drop --{name}")
    return errors


def recipe_preset(given: dict) -> dict:
    """The --recipe preset's values for the fields that neither your flags nor the tiny model's smaller
    defaults set (so a tiny run keeps no warm-up). Prints the recipe; a bad recipe flag stops here
    (SystemExit naming the flag), before any model loads."""
    recipe = given.get("recipe", Config.recipe)
    if recipe not in RECIPES:
        raise SystemExit(f"invalid config:\n  --recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    small = SMALL_MODEL_DEFAULTS.get(given.get("model", Config.model), {})
    preset = {k: v for k, v in RECIPES[recipe].items()  # only what differs from Config's defaults
              if k not in given and k not in small and v != getattr(Config, k)}
    values = {**{f.name: f.default for f in dataclasses.fields(Config)}, **small, **preset, **given}
    errors = recipe_errors(values, given)
    if errors:
        raise SystemExit("invalid config:\n  " + "\n  ".join(errors))
    print(f"recipe {recipe}: " + ", ".join(f"{k}={values[k]}" for k in RECIPE_FIELDS)
          + (f" (your flags: {', '.join(k for k in RECIPE_FIELDS if k in given)})" if set(given) & set(RECIPE_FIELDS) else ""))
    return preset


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
# 3. Answers: extraction and the vote key
# ================================================================================================
# The vote key (checker.normalize_answer) is string work only, cheap and deterministic: `1/2`, `\dfrac12`
# and `0.5` land on one key (an exact fraction), a trailing unit word or `\text{}` goes, `x = 5` meets `5`,
# and an answer too long to be real gets no key. A student's answer is its last \boxed{} (final_answer).
# The machinery, and the evaluation checker built on the same clean-up, live in checker.py.
# (imported at the top: extract_boxed, final_answer, normalize_answer)


# ================================================================================================
# 4. Rewards
# ================================================================================================


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


def band_y_min(group: int, lo: float, hi: float, floor: str = "band") -> float:
    """The tent's value at the band edges.

    code  (floor="band"):  y_min = 1 / |{k/G : k = 1..G, lo <= k/G <= hi}|; with G = 8 and [0.5, 0.9] the
                           reachable rates are 4/8..7/8, so y_min = 1/4.
    paper (floor="group"): y_min = 1/G = 1/8.
    """
    if floor == "group":
        return 1.0 / group
    n = sum(1 for k in range(1, group + 1) if in_band(k / group, lo, hi))
    return 1.0 / max(n, 1)


def in_band(s: float, lo: float, hi: float) -> bool:
    """lo <= s <= hi, with a little slack so rates like 9/10 are not lost to rounding."""
    return lo - 1e-9 <= s <= hi + 1e-9


def solvability_reward(s: float, group: int, lo: float, hi: float, floor: str = "band") -> float:
    """R_solv(s) = 1 - (1 - y_min) |s - m| / (m - lo) for lo <= s <= hi, else 0;  m = (lo + hi) / 2.

    y_min from band_y_min: code 1/#{k/G in band}; paper (Eq. 2, eta = (1 - 1/G)/(m - lo)) 1/G.
    A tent on the difficulty band: problems the student solves about m of the time score 1, ones it
    always or rarely agrees on score 0, so the teacher is pushed to the edge of the student's ability.
    """
    if not in_band(s, lo, hi):
        return 0.0
    m = (lo + hi) / 2
    if m - lo < 1e-12:  # a zero-width band: any rate in it is the peak
        return 1.0
    return 1.0 - (1.0 - band_y_min(group, lo, hi, floor)) * abs(s - m) / (m - lo)


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
# 5. Rollout: teacher and student
# ================================================================================================


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


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# The two generation engines (--engine). "continuous" is transformers' own continuous batching
# (engines.py): a finished sequence's slot goes to a waiting one instead of idling until its batch's
# longest member ends. "auto" picks per device, by measurement (README, "Generation engines"); on CUDA
# `generate` until a GPU has measured the two side by side.
ENGINES = {"generate": "HF model.generate, padded batches of --gen_batch",
           "continuous": "transformers continuous batching, paged KV cache (engines.py)"}
AUTO_ENGINE = {"cpu": "continuous", "cuda": "generate"}


def resolve_engine(engine: str, model) -> str:
    """The engine that runs `model`: "auto" by device, falling back to `generate` where the continuous
    engine would change the model's distribution (Gemma-2's soft-capping); asked for, that is an error."""
    if engine == "generate" or (engine == "auto" and AUTO_ENGINE.get(model.device.type) != "continuous"):
        return "generate"
    import engines  # beside this file; only the continuous engine needs it
    refusal = engines.softcap_refusal(model)
    if refusal and engine == "continuous":
        raise ValueError(refusal)
    return "generate" if refusal else "continuous"


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float, top_k: int,
             top_p: float, batch_size: int, desc: str = "", min_new_tokens: int = 0, engine: str = "generate",
             kv_cache_gib: float = 0.0, greedy: bool = False) -> list:
    """Sample one completion per prompt with either engine; both return Completions cut at the first EOS
    with the token ids sampled. `generate`: left padding, KV cache, batches of `batch_size` prompts sorted
    by length (less padding), halved on out-of-memory. `continuous`: engines.generate_continuous, every
    prompt at once into a paged KV cache, its budget halved on out-of-memory. `greedy`: argmax (tests)."""
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]  # template has BOS
    out: list = [None] * len(prompts)
    if resolve_engine(engine, model) == "continuous":
        if min_new_tokens:
            raise ValueError("--engine continuous has no min_new_tokens (transformers drops that processor)")
        import engines  # beside this file; only the continuous engine needs it
        gen = engines.generate_continuous(model, encoded, eos_ids, max_new_tokens, temperature, top_k, top_p,
                                          greedy=greedy, kv_cache_gib=kv_cache_gib, log=print, desc=desc)
        for i, g in enumerate(gen):
            ids, truncated = cut_at_eos(g, eos_ids)
            out[i] = Completion(encoded[i], ids, tokenizer.decode(ids, skip_special_tokens=True), truncated)
        return out
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    bar = _progress(total=len(prompts), desc=desc)
    pos = 0
    while pos < len(order):
        idx = order[pos: pos + batch_size]
        input_ids, attn = pad_batch([encoded[i] for i in idx], pad_id, left=True)
        width = input_ids.shape[1]
        sample = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=top_k,
                                                           top_p=top_p)
        try:
            gen = model.generate(
                input_ids=input_ids.to(device), attention_mask=attn.to(device), **sample,
                max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, eos_token_id=eos_ids,
                pad_token_id=pad_id, use_cache=True)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err) or batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            torch.cuda.empty_cache()
            bar.write(f"[{desc}] out of memory: retrying with --gen_batch {batch_size}")
            continue
        for row, i in enumerate(idx):
            ids, truncated = cut_at_eos(gen[row, width:].tolist(), eos_ids)
            out[i] = Completion(encoded[i], ids, tokenizer.decode(ids, skip_special_tokens=True), truncated)
        bar.update(len(idx))
        pos += len(idx)
    bar.close()
    return out


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not desc)


# ================================================================================================
# 6. Scoring a round
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
    combined: float = 0.0  # the ranking key (select_key): w_solv R_solv + w_div R_div (code) or R_T (paper)
    embedding: Optional[torch.Tensor] = None  # raw mean-pooled hidden state (d,)

    @property
    def scored(self) -> bool:
        """Has a score: legal, and at least one solution gave a parsed answer (the authors' gating)."""
        return self.parsed.legal and self.n_parsed > 0


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
        c.student_rewards = student_rewards(
            c.answers, c.majority, [student_format_reward(s.text, cfg.student_format) for s in c.solutions], cfg)
    if legal and cfg.w_div > 0:
        emb = torch.stack([c.embedding for c in legal])  # (n, d)
        center = cfg.div_embed == "center"
        divs = (nearest_distance(emb, pool_emb, center) if cfg.div_mode == "nearest"
                else diversity_rewards(emb, pool_emb, cfg.div_topk, center))
        for c, d in zip(legal, divs.tolist()):
            c.div = d
    for c in legal:
        c.reward = teacher_total(c.solv, c.div, c.length, c.fmt, cfg)
        c.combined = c.reward if cfg.select_key == "total" else cfg.w_solv * c.solv + cfg.w_div * c.div


def group_spread(combined: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """Var of the ranking key within each reference group, over the members that have a score (both
    recipes, as the authors compute it); -1 for a group with none, so it ranks last.
    combined, scored: (n_groups, g) -> (n_groups,)."""
    out = np.full(combined.shape[0], -1.0)
    for i, (row, ok) in enumerate(zip(combined, scored.astype(bool))):
        if ok.any():
            out[i] = row[ok].var()
    return out


def select_teacher_group(combined: np.ndarray, scored: np.ndarray) -> int:
    """Recipe code, per round: argmax_j Var{key_i : i in group j, i scored}, the most informative group
    for GRPO (first among ties); groups with no scored member rank last."""
    return int(np.argmax(group_spread(combined, scored)))


def select_student_problem(cands: list) -> Optional[int]:
    """Recipe code, per round: argmax_i key_i over the scored candidates (first among ties), or None."""
    ok = [i for i, c in enumerate(cands) if c.scored]
    return max(ok, key=lambda i: cands[i].combined) if ok else None


def select_step(rounds_cands: list, g: int, teacher_frac: float, student_frac: float) -> list:
    """Recipe paper, per step: of all K reference groups of the step keep the round(teacher_frac K) with the
    largest Var(key) (as group_spread), and the round(student_frac K) scored problems with the largest key
    (at least one each; ties: the earliest). At the defaults K = 16 x 4 = 64: 32 + 32 groups, 512 sequences.
    Returns, per round, (kept teacher groups, kept candidate indices)."""
    spread, keys = [], []
    for r, cands in enumerate(rounds_cands):
        sp = group_spread(np.array([c.combined for c in cands]).reshape(-1, g),
                          np.array([c.scored for c in cands]).reshape(-1, g))
        spread += [(v, r, j) for j, v in enumerate(sp)]
        keys += [(c.combined, r, i) for i, c in enumerate(cands) if c.scored]
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
        group = select_teacher_group(np.array([c.combined for c in cands]).reshape(-1, g),
                                     np.array([c.scored for c in cands]).reshape(-1, g))  # (n_refs, g) each
        best = select_student_problem(cands)
        chosen.append(([group], [] if best is None else [best]))
    return chosen


# ================================================================================================
# 7. Advantages
# ================================================================================================


def group_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """A_i = (R_i - mean(R)) / (std(R) + eps) within each group (rows); std unbiased, as TRL computes it.

    rewards: (n_groups, group_size). A group whose rewards are all equal gets A = 0 (a zero numerator,
    up to rounding, over eps), never NaN.
    """
    mean = rewards.mean(dim=1, keepdim=True)  # (n, 1)
    std = rewards.std(dim=1, keepdim=True)  # (n, 1), needs group_size >= 2 (Config.validate)
    return (rewards - mean) / (std + eps)  # (n, G)


# ================================================================================================
# 8. Log-probs and the GRPO loss
# ================================================================================================


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


# ================================================================================================
# 9. Models and checkpoints
# ================================================================================================

MODELS = {  # short names -> hub ids; any hub id or local directory works too
    "gemma-2-2b-it": "google/gemma-2-2b-it",
    "llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
}

# The architectures behind the short names, written down so `--random_init` can build any of them
# with random weights and no download: enough to measure memory and speed before fetching weights.
ARCHITECTURES = {
    "gemma-2-2b-it": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
        rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True),
    "llama-3.2-3b-instruct": dict(
        model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
        hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192), tie_word_embeddings=True),
    "qwen2.5-1.5b-instruct": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True),
}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no GPU (use --device cpu)")
    return torch.device(device)


def compute_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """bf16 on GPU (Gemma-2 is unstable in fp16), fp32 on CPU."""
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return torch.float32
    return torch.bfloat16


def model_name_error(name: str, random_init: bool = False) -> Optional[str]:
    """Why `name` cannot name a model, or None. Checked before anything loads."""
    if random_init:
        return None if name in ARCHITECTURES else (
            f"--random_init builds the architectures of {', '.join(ARCHITECTURES)}, not {name!r}")
    if name in ("tiny", "toy") or name in MODELS or os.path.isdir(name) or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return None
    return (f"unknown model {name!r}. Short names: {', '.join(['tiny', 'toy', *MODELS])}. "
            "Or pass a hub id (org/name) or the path of a local directory holding a saved model.")


def hub_error(path: str) -> Optional[str]:
    """For a hub id not in the local cache, why it cannot be fetched now (offline mode, or no route to
    the hub), in one sentence: transformers would spend ~30 s retrying and end in a long traceback."""
    if os.path.isdir(path) or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return None
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return None
    fix = (f"download it on a machine with access (`hf download {path} --local-dir DIR`), copy DIR here "
           "and pass DIR instead of the hub id")
    if constants.HF_HUB_OFFLINE:
        return f"{path} is neither a local directory nor in the local hub cache, and HF_HUB_OFFLINE is set: {fix}"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy decides what is reachable; let transformers try
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=10).close()
    except OSError as err:
        return f"{path} is neither a local directory nor in the local hub cache, and {url.hostname} cannot be reached ({err}): {fix}"
    return None


def resolve_model(name: str) -> str:
    """Short name -> hub id; "tiny" -> its cache directory (built on first use); else as given."""
    if model_name_error(name):
        raise ValueError(model_name_error(name))
    if name == "tiny":
        import tiny  # the toy model's builder lives beside this file; only --model tiny needs it
        return tiny.ensure_tiny_model()
    if name == "toy":
        import tiny
        return tiny.ensure_toy_model()
    return MODELS.get(name, name)


def attention_for(model_type: str, attn: str = "auto") -> str:
    """Gemma-2 soft-caps its attention logits; SDPA kernels drop the cap, eager attention keeps it."""
    if attn != "auto":
        return attn
    return "eager" if model_type.startswith("gemma2") else "sdpa"


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` entries and a chat template, for random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<user>", "<assistant>"]})
    tok.chat_template = ("<bos>{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant> {% endif %}")
    return tok


def load_model(name_or_path: str, device: str = "auto", dtype: str = "auto", attn: str = "auto",
               random_init: bool = False, seed: int = 0):
    """(model, tokenizer) on the device, in eval mode. dtype "fp32" for trained (master) weights."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    dev = pick_device(device)
    torch_dtype = compute_dtype(dev, dtype)
    if random_init:
        if model_name_error(name_or_path, random_init=True):
            raise ValueError(model_name_error(name_or_path, random_init=True))
        arch = dict(ARCHITECTURES[name_or_path])
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0  # synthetic_tokenizer's
        tokenizer = synthetic_tokenizer(config.vocab_size)
        torch.manual_seed(seed)  # the same seed gives the same "initial weights" (policy and reference)
        with torch.device(dev):  # initialised where it runs: 2-3 B random weights take minutes on a CPU
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch_dtype, attn_implementation=attention_for(config.model_type, attn))
    else:
        path = resolve_model(name_or_path)
        unreachable = hub_error(path)
        if unreachable:
            raise OSError(unreachable)
        try:
            config = AutoConfig.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, attn_implementation=attention_for(config.model_type, attn))
        except (OSError, ValueError, SafetensorError) as err:  # missing or damaged files, no network, not a model
            hint = ("Its files may be damaged or incomplete (for a checkpoint, use an older one)." if os.path.isdir(path)
                    else "If this machine is offline, download the model elsewhere and pass its local directory.")
            raise OSError(f"could not load {path!r}: {(str(err).strip().splitlines() or [''])[0]}\n{hint}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(dev).eval(), tokenizer


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list, batch_size: int = 64) -> torch.Tensor:
    """Diversity embedding: the last hidden layer mean-pooled over the text's tokens (no chat
    template, padding excluded), fp32 on the CPU, (n, d). Normalisation happens when comparing."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = [tokenizer(t, add_special_tokens=True)["input_ids"] or [tokenizer.pad_token_id]
               for t in texts[i: i + batch_size]]
        ids, mask = pad_batch(enc, tokenizer.pad_token_id)  # (b, L) each
        h = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state  # (b, L, d)
        m = mask.to(device).unsqueeze(-1).to(h.dtype)  # (b, L, 1)
        out.append(((h * m).sum(1) / m.sum(1)).float().cpu())  # (b, d)
    return torch.cat(out) if out else torch.zeros(0, 0)


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


def jsonl_objects(path: str, label: str = "", expected: str = "a JSON object"):
    """(where, row) for each non-blank line of a JSONL file, `where` naming the file and line; a line
    that is not a JSON object is a ValueError that says where and what was `expected`. Lazy: a large
    file streams."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{label}{path}, line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected {expected}")
            yield where, row


def read_init_pool(path: str) -> list:
    """--init_pool rows: one JSON object a line with a non-blank "problem" and optional "concepts" (a
    list of strings), as init_pool.jsonl is written. Anything else is an error naming file and line."""
    rows = []
    try:
        expected = 'a JSON object with a non-blank "problem" string'
        for where, row in jsonl_objects(path, "--init_pool ", expected):
            if not isinstance(row.get("problem"), str) or not row["problem"].strip():
                raise ValueError(f"{where}: expected {expected}")
            concepts = row.get("concepts", [])
            if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
                raise ValueError(f'{where}: "concepts" must be a list of strings')
            rows.append({"problem": row["problem"], "concepts": concepts})
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--init_pool {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    if not rows:
        raise ValueError(f"--init_pool {path} holds no problems; pass a JSONL of problems or leave "
                         "--init_pool out to grow the starting pool")
    return rows


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def round_seed(seed: int, step: int, rnd: int) -> int:
    """The seed of one round of training: a function of (seed, step, round) alone, so the round samples
    the same whichever rank plays it and however many ranks there are, and a resume needs no RNG state."""
    return int(np.random.SeedSequence([seed, step, rnd]).generate_state(1)[0])


def checkpoint_dir(out: str, step: int) -> str:
    return os.path.join(out, f"ckpt-{step:05d}")


def checkpoints(out: str) -> list:
    """Every ckpt-NNNNN directory in out, oldest first (complete or not)."""
    if not os.path.isdir(out):
        return []
    return sorted(os.path.join(out, d) for d in os.listdir(out)
                  if re.fullmatch(r"ckpt-\d{5}", d) and os.path.isdir(os.path.join(out, d)))


def checkpoint_step(path: str) -> int:
    return int(os.path.basename(os.path.normpath(path))[5:])


def latest_checkpoint(out: str) -> Optional[str]:
    """The newest checkpoint that can be resumed: complete (state.pt is written last) and holding
    optimizer.pt."""
    done = [d for d in checkpoints(out) if all(os.path.exists(os.path.join(d, f)) for f in ("state.pt", "optimizer.pt"))]
    return done[-1] if done else None


def load_pt(path: str):
    """torch.load with an error that names the file and what to do, instead of a pickle traceback."""
    try:
        return torch.load(path, weights_only=False)
    except Exception as err:  # truncated zip, unpickling errors, I/O errors: all mean a damaged file
        why = (str(err).splitlines() or [""])[0][:160]
        raise SystemExit(f"{path} is damaged or unreadable ({type(err).__name__}: {why}). Continue from an older "
                         f"checkpoint with --resume_from {os.path.join(os.path.dirname(os.path.dirname(path)) or '.', 'ckpt-NNNNN')}, "
                         "or start a new --out.") from None


def save_checkpoint(out: str, step: int, policy, tokenizer, optimizer, scheduler, pool: Pool,
                    rng: dict, cfg: Config, full: Optional[tuple] = None) -> str:
    """Model and tokenizer by save_pretrained (loadable by transformers and eval.py), optimizer.pt, and
    state.pt with the rest an exact resume needs. Older checkpoints keep their weights and state but
    drop optimizer.pt: AdamW state is twice the fp32 weights, and only the newest is resumed from.
    A save that fails (a full disk) removes its half-written directory, so --resume finds the last good one.
    full: --fsdp's gathered (model, optimizer) state dicts, written in place of the sharded objects'."""
    import shutil
    path = checkpoint_dir(out, step)
    if os.path.exists(os.path.join(path, "state.pt")):
        os.remove(os.path.join(path, "state.pt"))  # overwriting: incomplete until the new state.pt lands
    try:
        policy.save_pretrained(path, **({"state_dict": full[0]} if full else {}))
        tokenizer.save_pretrained(path)
        state = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng, "pool": pool.state(),
                 "config": dataclasses.asdict(cfg)}
        for obj, name in ((full[1] if full else optimizer.state_dict(), "optimizer.pt"), (state, "state.tmp")):
            with open(os.path.join(path, name), "wb") as f:  # a Python file: a full disk is ENOSPC, not basic_ios
                torch.save(obj, f)
        os.replace(os.path.join(path, "state.tmp"), os.path.join(path, "state.pt"))  # last: marks it complete
    except (OSError, RuntimeError) as err:
        shutil.rmtree(path, ignore_errors=True)
        full = getattr(err, "errno", None) == errno.ENOSPC or shutil.disk_usage(out).free < 2**26
        raise OSError(errno.ENOSPC if full else getattr(err, "errno", None) or errno.EIO,
                      f"could not save checkpoint {path}" + (" (disk full)" if full else f" ({err})")) from err
    for d in checkpoints(out):
        old = os.path.join(d, "optimizer.pt")
        if d != path and os.path.exists(old):
            os.remove(old)
    return path


def cache_root() -> str:
    """Where the project keeps what it builds or downloads: $OPENSIR_CACHE, else ~/.cache/opensir."""
    return os.environ.get("OPENSIR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "opensir")


# ================================================================================================
# 10. The loop and main()
# ================================================================================================

# --- several processes: `torchrun --nproc_per_node N opensir.py ...` -------------------------------
# Every rank holds the whole model (policy, sampler, frozen reference) and plays rounds_per_step / N of
# a step's rounds (contiguous blocks, rank 0 first). Each round is seeded from (seed, step, round) and
# draws its references from the pool as it stood at the start of the step, so a round's rollouts do not
# depend on N or on the rank that plays it. The ranks then swap their rounds' candidates, so every rank
# holds the whole step (selection, the pool, the logs: the same code as one process), and each trains
# only its own rounds' sequences; gradients are summed across ranks (the loss weights already divide by
# the step's number of rounds), then clipped once. A plain `python opensir.py` run has N = 1 and never
# touches torch.distributed.


def dist_env() -> tuple:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def dist_errors(cfg: Config) -> list:
    """What torchrun's N and the config cannot be together (checked before any model loads)."""
    _, world = dist_env()
    errors = []
    if cfg.rounds_per_step % world:
        errors.append(f"--rounds_per_step {cfg.rounds_per_step} cannot be shared out over {world} processes "
                      f"(torchrun --nproc_per_node x --nnodes = {world}): pass a --rounds_per_step that "
                      f"{world} divides, or start a number of processes that divides {cfg.rounds_per_step}")
    if cfg.dist_timeout < 1:
        errors.append(f"--dist_timeout must be >= 1 second, got {cfg.dist_timeout}")
    if cfg.fsdp and world == 1:
        errors.append("--fsdp shards the training state over torchrun's processes: start the run with "
                      "torchrun --nproc_per_node N (N >= 2), or drop --fsdp")
    if cfg.fsdp and not hasattr(torch.nn.utils, "clip_grads_with_norm_"):
        errors.append(f"--fsdp needs a newer torch than {torch.__version__} (FSDP2 with summed gradients and "
                      "sharded clipping; tested on 2.13): upgrade torch, or drop --fsdp")
    return errors


def _dist():
    """torch.distributed when this run has several processes, else None."""
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    return _dist().get_rank() if _dist() else 0


def dist_init(cfg: Config) -> None:
    """Join torchrun's process group (gloo on CPU, nccl on GPUs; only when WORLD_SIZE > 1), then refuse
    a config that differs across ranks (another flag on another node)."""
    import datetime
    import hashlib
    import torch.distributed as dist
    rk, world = dist_env()
    if world == 1 or dist.is_initialized():
        return
    cuda = pick_device(cfg.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # "cuda" below means this rank's GPU
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    digest = hashlib.sha256(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in CONFIG_RUN_ONLY},
                                       sort_keys=True).encode()).hexdigest()
    digests = dist_call("all_gather_object", [None] * world, digest)
    if len(set(digests)) > 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise SystemExit(f"rank {rk}: ranks {bad} were started with a config other than rank 0's; start every "
                         "node with the same flags")


def dist_call(name: str, *args):
    """One collective of torch.distributed, with a clear message when it fails: another rank died, or did
    not arrive within --dist_timeout. all_gather_object and broadcast_object_list return their list."""
    dist = _dist()
    try:
        getattr(dist, name)(*args)
    except (RuntimeError, ValueError) as err:  # DistBackendError (a peer closed its socket), timeouts
        raise SystemExit(f"rank {dist.get_rank()}: {name} failed: another rank stopped or did not arrive "
                         f"within --dist_timeout ({(str(err).splitlines() or [''])[0][:200]})") from None
    return args[0] if name.endswith("_object") or name.endswith("_object_list") else None


def _slim(c: Candidate) -> Candidate:
    """A candidate to send to the other ranks: without prompt tokens (they only train their own rounds)."""
    return dataclasses.replace(c, completion=dataclasses.replace(c.completion, prompt_ids=[]),
                               solutions=[dataclasses.replace(s, prompt_ids=[]) for s in c.solutions])


def share_rounds(mine: dict, n_rounds: int) -> list:
    """Every round's candidates, in round order, on every rank; a rank keeps its own rounds as they are."""
    if _dist() is None:
        return [mine[r] for r in range(n_rounds)]
    parts = dist_call("all_gather_object", [None] * _dist().get_world_size(), {r: [_slim(c) for c in cs] for r, cs in mine.items()})
    every = {r: cs for part in parts for r, cs in part.items()}
    return [mine.get(r, every[r]) for r in range(n_rounds)]


def same_on_every_rank(pool: Pool, policy) -> str:
    """Check, at every checkpoint, that the ranks still hold the same pool and weights (they should by
    construction: a difference is a bug or a broken GPU, and stops the run). Returns the pool's digest."""
    import hashlib
    h = hashlib.sha256(json.dumps([pool.problems, pool.concepts]).encode())
    if pool.embeddings is not None:
        h.update(pool.embeddings.numpy().tobytes())
    with torch.no_grad():
        weights = float(sum(p.double().sum() for p in policy.parameters()))  # one checksum of the weights
    if _dist() is None:
        return h.hexdigest()
    seen = dist_call("all_gather_object", [None] * _dist().get_world_size(), (h.hexdigest(), weights))
    if len(set(seen)) > 1:
        raise SystemExit(f"rank {rank()}: the ranks' pools or weights differ (pool digest, weight sum per rank: "
                         f"{seen}); this is a bug, please report it with the command line")
    return h.hexdigest()


def sum_gradients(params: list) -> None:
    """Sum every gradient over the ranks (each rank's loss already carries its share of 1 / rounds)."""
    if _dist() is None:
        return
    for p in params:
        if p.grad is None:  # a rank none of whose sequences were selected still takes part
            p.grad = torch.zeros_like(p)
        dist_call("all_reduce", p.grad)


# --fsdp: FSDP2 (fully_shard) holds 1/N of the fp32 weights, gradients and AdamW state on each rank.
# sequence_logprobs calls the decoder and the lm_head separately (never the whole model's forward), so
# the units are every decoder layer and, when untied, the input embedding and the lm_head; the rest (the
# final norm; a tied embedding/lm_head, which one unit cannot serve from two call sites) stays whole on
# every rank and is summed by sum_gradients. FSDP's reduce-scatter sums the sharded gradients (divide
# factor 1). Generation and the reference use whole per-rank copies (the sampler), so only training
# runs FSDP's collectives, and every rank runs as many passes (optimise pads).


def shard_policy(policy) -> None:
    """fully_shard every decoder layer and, untied, the embedding and the lm_head; gradients summed."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    head, embed = policy.get_output_embeddings(), policy.get_input_embeddings()
    units = [m for m in policy.get_decoder().modules() if type(m).__name__ in set(policy._no_split_modules or ())]
    for m in units + ([embed, head] if head.weight is not embed.weight else []):
        # every unit is its own root (no whole-model forward), and FSDP keeps a root's weights gathered
        # after its forward unless told: reshard, or each rank holds the whole fp32 model until backward
        fully_shard(m, reshard_after_forward=True)
    for m in policy.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # each rank's loss already carries its share of 1 / rounds
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)


def clip_gradients(params: list, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over the whole model's gradient: sharded (DTensor) and whole parameters together."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in params if p.grad is not None]
    parts = [torch.nn.utils.get_total_norm([g for g in grads if isinstance(g, DTensor) == d]) for d in (True, False)]
    parts = [n.full_tensor() if isinstance(n, DTensor) else n for n in parts]  # DTensor: the norm over all shards
    total = torch.sqrt(sum(n.float() ** 2 for n in parts))
    for d in (True, False):  # foreach kernels take no mix of the two
        torch.nn.utils.clip_grads_with_norm_([p for p in params if isinstance(p, DTensor) == d], max_norm, total)
    return total


def refresh_sampler(sampler, policy) -> None:
    """Copy the updated weights into the generation copy; with --fsdp one parameter gathered at a time."""
    from torch.distributed.tensor import DTensor
    full = dict(policy.named_parameters())
    with torch.no_grad():
        for name, ps in sampler.named_parameters():
            pp = full[name]
            ps.copy_(pp.full_tensor() if isinstance(pp, DTensor) else pp)


def full_training_state(policy, optimizer) -> tuple:
    """--fsdp: the whole model and optimizer state dicts, on rank 0's CPU (a collective: every rank calls)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(policy, options=opts), get_optimizer_state_dict(policy, optimizer, options=opts)


def load_sharded_optimizer(policy, optimizer, path: str) -> None:
    """--fsdp resume: every rank reads the full optimizer state and keeps its shard (any N)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(policy, optimizer, optim_state_dict=load_pt(path),
                             options=StateDictOptions(full_state_dict=True))


def parse_candidate(text: str, cfg: Config) -> TeacherOutput:
    """parse_teacher, except with --random_init, where every output counts as a legal problem so that
    benchmarks of random weights run the student phase at full size."""
    if cfg.random_init:
        return TeacherOutput(text.strip() or "?", ["random weights"], False, True)
    return parse_teacher(text)


def play_round(sampler, frozen, tokenizer, pool: Pool, refs: list, cfg: Config, timers: Counter,
               step_pool: Optional[torch.Tensor] = None) -> list:  # step_pool: the pool before the step (div_mode nearest)
    """One round of self-play: teacher writes problems, student solves them, rewards are computed.
    Returns the n_refs * g Candidates, grouped by reference (group = index into refs)."""
    sample = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, batch_size=cfg.gen_batch,
                  engine=cfg.engine, kv_cache_gib=cfg.kv_cache_gib)
    t0 = time.perf_counter()
    prompts = [chat(tokenizer, teacher_prompt(pool.problems[r])) for r in refs for _ in range(cfg.teacher_group)]
    outs = generate(sampler, tokenizer, prompts, cfg.teacher_max_new_tokens, desc="teacher", **sample)
    cands = [Candidate(i // cfg.teacher_group, o, parse_candidate(o.text, cfg)) for i, o in enumerate(outs)]
    legal = [c for c in cands if c.parsed.legal]
    t1 = time.perf_counter()
    prompts = [chat(tokenizer, student_prompt(c.parsed.problem)) for c in legal for _ in range(cfg.student_group)]
    sols = generate(sampler, tokenizer, prompts, cfg.student_max_new_tokens, desc="student", **sample)
    for j, c in enumerate(legal):
        c.solutions = sols[j * cfg.student_group: (j + 1) * cfg.student_group]
        c.answers = [normalize_answer(final_answer(s.text)) for s in c.solutions]
    t2 = time.perf_counter()
    if cfg.random_init:  # random weights box nothing: their last words vote, so the student phase trains at full size
        for c in legal:
            c.answers = [a if a is not None else (s.text.split() or ["?"])[-1] for a, s in zip(c.answers, c.solutions)]
    if legal and cfg.w_div > 0:
        for c, e in zip(legal, embed_texts(frozen, tokenizer, [c.parsed.problem for c in legal])):
            c.embedding = e
    nearest = cfg.div_mode == "nearest" and step_pool is not None
    score_candidates(cands, step_pool if nearest else pool.embeddings, cfg)
    timers["teacher_gen"] += t1 - t0
    timers["student_gen"] += t2 - t1
    timers["teacher_tokens"] += sum(len(o.ids) for o in outs)
    timers["student_tokens"] += sum(len(s.ids) for s in sols)
    timers["scoring"] += time.perf_counter() - t2
    return cands


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


def grow_starting_pool(sampler, frozen, tokenizer, cfg: Config, log) -> Pool:
    """Before RL, grow the pool from the seed problem with the untrained model: the same teacher and
    student steps, keeping only in-band problems that pass starting_pool_filter."""
    pool = Pool()
    seed_emb = embed_texts(frozen, tokenizer, [cfg.seed_problem]) if cfg.w_div > 0 else None
    pool.add([cfg.seed_problem], [[]], seed_emb)
    if cfg.init_pool:  # a saved pool: one JSON object with a "problem" (and "concepts") per line
        rows = read_init_pool(cfg.init_pool)  # already checked by Config.validate
        emb = embed_texts(frozen, tokenizer, [r["problem"] for r in rows]) if cfg.w_div > 0 and rows else None
        pool.add([r["problem"] for r in rows], [r.get("concepts", []) for r in rows], emb)
        log(f"starting pool: {len(rows)} problems from {cfg.init_pool}")
        return pool
    if cfg.init_pool_size == 0 or cfg.start_pool == "seed":  # recipe paper starts RL from the seed alone
        return pool
    kept, timers = [], Counter()
    bar = _progress(total=cfg.init_pool_size, desc="starting pool")
    for r in range(cfg.init_pool_max_rounds):
        if len(kept) >= cfg.init_pool_size:
            break
        refs = [random.randrange(len(pool.problems)) for _ in range(cfg.n_refs)]
        cands = [c for c in play_round(sampler, frozen, tokenizer, pool, refs, cfg, timers)
                 if starting_pool_filter(c, cfg)][: cfg.init_pool_size - len(kept)]
        add_to_pool(pool, cands, cfg)
        kept += cands
        bar.update(len(cands))
    bar.close()
    log(f"starting pool: {len(kept)} of {cfg.init_pool_size} in-band problems after {r + 1} rounds"
        + ("" if len(kept) >= cfg.init_pool_size else " (stopped at --init_pool_max_rounds)"))
    if rank() != 0:  # every rank grows the same pool (same seed); rank 0 alone writes it
        return pool
    with open(os.path.join(cfg.out, "init_pool.jsonl"), "w") as f:
        for c in kept:
            f.write(json.dumps({"problem": c.parsed.problem, "concepts": c.parsed.concepts,
                                "solve_rate": c.solve_rate, "majority": c.majority}) + "\n")
    return pool


def optimise(policy, frozen, optimizer, scheduler, rounds: list, cfg: Config, autocast_dtype,
             guard: Optional["StepGuard"] = None, own: Optional[list] = None) -> dict:
    """updates_per_rollout optimiser steps on one batch of rounds. L = mean over rounds of L_round.
    Several ranks: the weights come from all the step's rounds, each rank backpropagates only `own` (its
    rounds' sequences), and the gradients are summed across ranks before the one clip: the sum of the
    ranks' losses is L itself, so the step equals one process's up to float summation order."""
    set_loss_weights(rounds, cfg.loss_agg, max(cfg.teacher_max_new_tokens, cfg.student_max_new_tokens))
    seqs = sorted(own if own is not None else (s for r in rounds for s in r), key=lambda s: -(len(s.prompt_ids) + len(s.ids)))
    trained = any(len(r) for r in rounds)  # the same on every rank: `rounds` holds the whole step's sequences
    batches = [seqs[i: i + cfg.train_micro_batch] for i in range(0, len(seqs), cfg.train_micro_batch)]
    if cfg.fsdp and _dist() is not None:  # FSDP gathers in every pass: all ranks run the same number of them
        most = torch.tensor([len(batches)], device=next(policy.parameters()).device)
        dist_call("all_reduce", most, _dist().ReduceOp.MAX)
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
            sum_gradients([p for p in policy.parameters() if not isinstance(p, DTensor)])
            grad_norm = clip_gradients(list(policy.parameters()), cfg.max_grad_norm)
        else:
            sum_gradients(list(policy.parameters()))
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        if guard is not None:
            guard.begin()  # from the first weight update until the step is recorded, Ctrl-C waits
        optimizer.step()
        scheduler.step()
        stats["grad_norm"] += float(grad_norm)
    optimizer.zero_grad(set_to_none=True)  # free gradient memory before the next generation phase
    policy.eval()
    if _dist() is not None:  # the step's loss, KL and clip share over every rank's tokens
        keys = ("loss", "kl_sum", "tokens", "clipped")
        total = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=next(policy.parameters()).device)
        dist_call("all_reduce", total)
        for k, v in zip(keys, total.tolist()):
            stats[k] = v  # (Counter.update would add)
    n = cfg.updates_per_rollout
    return {"loss": stats["loss"] / n, "kl": stats["kl_sum"] / max(stats["tokens"], 1),
            "clip_frac": stats["clipped"] / max(stats["tokens"], 1), "grad_norm": stats["grad_norm"] / n,
            "lr": scheduler.get_last_lr()[0]}


class StepGuard:
    """Ctrl-C stops the run at once, except between a step's first weight update and the moment the
    step is recorded: then it waits, so the checkpoint saved on exit is never half a step."""

    def __init__(self):
        self.critical = self.pending = False

    def handler(self, *_):
        if self.critical:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def begin(self):
        self.critical = True

    def end(self):
        self.critical = False
        if self.pending:
            raise KeyboardInterrupt


def step_metrics(step: int, rounds_cands: list, rounds: list, chosen: list, pool: Pool, cfg: Config, opt: dict,
                 timers: Counter) -> dict:
    """One metrics.jsonl line: every reward component by role, solve-rate histogram, lengths, costs."""
    cands = [c for cs in rounds_cands for c in cs]
    legal = [c for c in cands if c.parsed.legal]
    seqs = [s for r in rounds for s in r]
    teach = [s for s in seqs if s.role == "teacher"]
    stud = [s for s in seqs if s.role == "student"]
    mean = lambda xs: float(np.mean(xs)) if len(xs) else 0.0  # noqa: E731
    hist = np.histogram([c.solve_rate for c in legal if c.n_parsed], bins=10, range=(0, 1))[0]
    peak = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
            else _rss_gib())
    return {
        "step": step, "recipe": cfg.recipe, **opt,
        "teacher/legal_rate": len(legal) / max(len(cands), 1),
        "teacher/reward": mean([c.reward for c in cands]),
        "teacher/solvability": mean([c.solv for c in legal]),
        "teacher/diversity": mean([c.div for c in legal]),
        "teacher/length": mean([c.length for c in legal]),
        "teacher/format": mean([c.fmt for c in legal]),
        "student/reward": mean([r for c in legal for r in c.student_rewards]),
        "student/agree": mean([float(a is not None and a == c.majority) for c in legal for a in c.answers]),
        "student/format": mean([student_format_reward(s.text, cfg.student_format) for c in legal for s in c.solutions]),
        "student/parsed_rate": mean([float(a is not None) for c in legal for a in c.answers]),
        "solve_rate/mean": mean([c.solve_rate for c in legal if c.n_parsed]),
        "solve_rate/in_band": mean([float(c.solv > 0) for c in legal]),
        "solve_rate/hist10": hist.tolist(),
        "rounds/no_legal": sum(not any(c.parsed.legal for c in cs) for cs in rounds_cands),
        "rounds/no_student": sum(not studs for _, studs in chosen),  # per round in both scopes
        "train/teacher_seqs": len(teach), "train/student_seqs": len(stud),
        "train/teacher_adv_abs": mean([abs(s.advantage) for s in teach]),
        "train/student_adv_abs": mean([abs(s.advantage) for s in stud]),
        "len/teacher": mean([len(c.completion.ids) for c in cands]),
        "len/student": mean([len(s.ids) for c in legal for s in c.solutions]),
        "pool": len(pool.problems),
        **{f"sec/{k}": round(timers[k], 3) for k in ("teacher_gen", "student_gen", "scoring", "train", "step")},
        "tok_per_sec/teacher": timers["teacher_tokens"] / max(timers["teacher_gen"], 1e-9),
        "tok_per_sec/student": timers["student_tokens"] / max(timers["student_gen"], 1e-9),
        "peak_mem_gib": round(peak, 3),
    }


def _rss_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def problem_rows(step: int, rnd: int, ref_texts: list, cands: list, groups: list, students: list) -> list:
    """problems.jsonl rows: every teacher output of the round with its reference and scores."""
    rows = []
    for i, c in enumerate(cands):
        rows.append({
            "step": step, "round": rnd, "reference": ref_texts[c.group], "problem": c.parsed.problem,
            "legal": c.parsed.legal, "concepts": c.parsed.concepts, "solve_rate": c.solve_rate,
            "n_parsed": c.n_parsed, "majority": c.majority, "answers": c.answers,
            "rewards": {"total": c.reward, "solvability": c.solv, "diversity": c.div, "length": c.length,
                        "format": c.fmt},
            "trained_as_teacher": c.group in groups, "trained_as_student": i in students,
            "teacher_output": c.completion.text,
        })
    return rows


CONFIG_RUN_ONLY = {"out", "resume", "resume_from", "steps", "save_every", "device", "gen_batch",
                   "train_micro_batch", "logprob_chunk", "grad_ckpt", "dist_timeout", "threads", "engine",
                   "kv_cache_gib"}  # may change between a run and its resume

_OUT_LOCKS: dict = {}  # real path of --out -> its open .lock file, held for the life of the process


def lock_out(out: str) -> None:
    """Create --out and hold an exclusive flock on OUT/.lock: a second run into the same --out refuses at
    once. The kernel drops the lock when the process ends, however it ends, so none is ever stale."""
    import fcntl
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out} is a file, not a directory; choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
        if os.path.realpath(out) in _OUT_LOCKS:
            return
        f = open(os.path.join(out, ".lock"), "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise SystemExit(f"another run is writing to {out} (it holds {os.path.join(out, '.lock')}). Wait "
                             "for it to end or stop it, or choose another --out.") from None
    except OSError as err:
        raise SystemExit(f"--out {out} cannot be written ({err.strerror or err}); choose a writable directory") from None
    _OUT_LOCKS[os.path.realpath(out)] = f


def _scan_log(path: str, keep_to: Optional[int] = None) -> int:
    """The last step logged in a metrics/problems JSONL (0 if none). A torn last line (a run killed
    mid-append, or a full disk) is dropped with a warning; a bad line elsewhere is an error naming file
    and line. With keep_to, the file is cut (in place: logs are appended in step order) before the torn
    line or the first line of a later step."""
    if not os.path.exists(path):
        return 0
    last, torn, cut, offset = 0, None, None, 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            if torn is not None:
                raise SystemExit(f"{path}, line {torn}: not a valid log line, and lines follow it. Fix or "
                                 "delete that line, then resume again.")
            try:
                step = json.loads(line)["step"]
                assert isinstance(step, int)
            except (ValueError, KeyError, TypeError, AssertionError):
                torn, cut = lineno, start if cut is None else cut
                continue
            last = max(last, step)
            if keep_to is not None and step > keep_to and cut is None:
                cut = start
    if keep_to is not None:
        if torn is not None:
            print(f"warning: {path}, line {torn}: torn last line (a run killed mid-write or a full disk); dropped")
        if cut is not None:
            os.truncate(path, cut)
        with open(path, "rb+") as f:  # a last line cut just before its newline: the next append needs one
            if f.seek(0, 2) and (f.seek(-1, 2), f.read(1))[1] != b"\n":
                f.write(b"\n")
    return last


def prepare_out(cfg: Config) -> Optional[str]:
    """Check --out before any model loads and return the checkpoint to resume from, if any. Refuses
    whenever going on would drop or overwrite what an earlier run left without the user asking.
    config.json is written only once the models have loaded, so a failed start blocks nothing."""
    lock_out(cfg.out)
    metrics, problems = os.path.join(cfg.out, "metrics.jsonl"), os.path.join(cfg.out, "problems.jsonl")
    ckpts, logged = checkpoints(cfg.out), _scan_log(metrics)
    grown = os.path.exists(os.path.join(cfg.out, "init_pool.jsonl"))
    names = [os.path.basename(d) for d in ckpts]
    found = ", ".join(([f"checkpoints {names[0]} to {names[-1]}" if len(names) > 1 else f"checkpoint {names[0]}"] if names else [])
                      + [f"steps logged up to {logged}"] * bool(logged) + ["a grown init_pool.jsonl"] * grown)
    resume = cfg.resume or bool(cfg.resume_from)
    cfg_path = os.path.join(cfg.out, "config.json")
    if not found:  # nothing a run finished is here: a failed or interrupted start blocks nothing
        if os.path.exists(cfg_path):
            print(f"{cfg.out} holds a run that stopped before its first step; starting it afresh")
        return None
    if not ckpts and not cfg.resume_from:
        raise SystemExit(f"{cfg.out} holds {found} but no checkpoint to resume from. To start over, choose "
                         "another --out" + (f" (to reuse the grown starting pool, pass --init_pool "
                                            f"{os.path.join(cfg.out, 'init_pool.jsonl')})" if grown else "") + ".")
    if not resume:
        raise SystemExit(f"{cfg.out} already holds a run ({found}). Pass --resume to continue it, or choose "
                         "another --out.")
    if os.path.exists(cfg_path):
        try:
            saved = json.load(open(cfg_path))
        except ValueError as err:
            raise SystemExit(f"{cfg_path} is damaged ({err}); restore it or choose another --out") from None
        diff = {k: (saved.get(k), v) for k, v in dataclasses.asdict(cfg).items()
                if k not in CONFIG_RUN_ONLY and saved.get(k) != v}
        if diff:
            raise SystemExit(f"{cfg.out} holds a run with a different config; refusing to touch it. "
                             "Differences (saved, now): " + ", ".join(f"{k}={a!r}->{b!r}" for k, (a, b) in diff.items()))
    if cfg.resume_from:
        path = cfg.resume_from if os.path.isdir(cfg.resume_from) else os.path.join(cfg.out, cfg.resume_from)
        if not (os.path.isdir(path) and os.path.samefile(os.path.dirname(os.path.abspath(path)), cfg.out)
                and re.fullmatch(r"ckpt-\d{5}", os.path.basename(os.path.normpath(path)))):
            raise SystemExit(f"--resume_from {cfg.resume_from}: not a checkpoint directory of --out {cfg.out} "
                             f"(found: {found})")
        if not os.path.exists(os.path.join(path, "state.pt")):
            raise SystemExit(f"--resume_from {path}: no state.pt, so it cannot be resumed; pick an older checkpoint")
        step = checkpoint_step(path)
        import shutil
        for d in checkpoints(cfg.out):  # kept under another name: nothing is overwritten or lost
            if checkpoint_step(d) > step:
                aside = d + f".before-resume-from-{step:05d}"
                shutil.move(d, aside)
                print(f"moved {d} aside to {aside}")
        resume_from = path
    else:
        newest, older = ckpts[-1], [d for d in ckpts if os.path.exists(os.path.join(d, "state.pt"))]
        missing = [f for f in ("state.pt", "optimizer.pt") if not os.path.exists(os.path.join(newest, f))]
        if missing:
            why = ("only the newest checkpoint keeps optimizer.pt, so a newer one was deleted or its save was cut off"
                   if missing == ["optimizer.pt"] else "deleted, or a save that was cut off")
            offer = (f"To continue from the newest checkpoint with state.pt, pass --resume_from {older[-1]} (steps after "
                     f"{checkpoint_step(older[-1])} are dropped from the logs and redone; newer checkpoint "
                     "directories are moved aside, not deleted" + ("" if os.path.exists(os.path.join(
                         older[-1], "optimizer.pt")) else "; AdamW restarts from zero moments: only the newest "
                         "checkpoint keeps optimizer state") + ").") if older else "No checkpoint has state.pt."
            raise SystemExit(f"--resume: the newest checkpoint {newest} has no {' and no '.join(missing)} "
                             f"({why}), so the run cannot be resumed exactly. Found: "
                             f"{found}. {offer}")
        resume_from = newest
    for p in (metrics, problems):  # steps after the checkpoint are redone
        _scan_log(p, keep_to=checkpoint_step(resume_from))
    return resume_from


def train(cfg: Config) -> str:
    """The whole method. Returns the path of the final checkpoint."""
    cfg.validate()
    errors = dist_errors(cfg)
    if errors:
        raise SystemExit("invalid config:\n  " + "\n  ".join(errors))
    dist_init(cfg)
    rk, world = dist_env()
    if rk == 0:  # one rank owns --out (its lock, the logs, the checkpoints); the others learn what it decided
        try:
            resume_from, why = prepare_out(cfg), None
        except SystemExit as err:
            resume_from, why = None, err.code
    if world > 1:
        resume_from, why = dist_call("broadcast_object_list", [resume_from, why] if rk == 0 else [None, None], 0)
    if why is not None:
        raise SystemExit(why if rk == 0 else 1)  # rank 0 says why, once
    state = load_pt(os.path.join(resume_from, "state.pt")) if resume_from else None  # damage shows before loading
    log = print if rk == 0 else (lambda *a, **k: None)
    if world > 1:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not cfg.random_init:
            resolve_model(cfg.model)  # the tiny model is built once a node, not by N processes at the same time
        dist_call("barrier")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    cdtype = compute_dtype(device, cfg.dtype)
    autocast_dtype = cdtype if cdtype != torch.float32 else None
    load = dict(device=cfg.device, attn=cfg.attn, seed=cfg.seed)

    # policy: fp32 master weights (at lr 3e-7 a bf16 weight cannot move); frozen: the initial weights,
    # for the KL term and the diversity embedding, in the compute dtype and never trained.
    policy, tokenizer = load_model(resume_from or cfg.model, dtype="fp32",
                                   random_init=cfg.random_init and not resume_from, **load)
    frozen = None
    if cfg.beta > 0 or cfg.w_div > 0:
        frozen, _ = load_model(cfg.model, dtype=cfg.dtype, random_init=cfg.random_init, **load)
        frozen.requires_grad_(False)
    # sampler: the policy itself in fp32, else a compute-dtype copy refreshed after every update
    sampler = policy
    if cdtype != torch.float32 or cfg.fsdp:  # --fsdp: the policy is sharded; generation needs it whole
        import copy
        sampler = copy.deepcopy(policy).to(cdtype).requires_grad_(False)
    if device.type == "cuda" and cfg.grad_ckpt:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.fsdp:
        shard_policy(policy)
    groups = list(policy.parameters())
    if cfg.fsdp:  # sharded and whole parameters in separate groups: AdamW's foreach kernels take no mix
        from torch.distributed.tensor import DTensor
        groups = [{"params": [p for p in groups if isinstance(p, DTensor) == d]} for d in (True, False)]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # linear warm-up reaching lr at step `warmup_steps`, then constant (lr/warmup on the first step,
    # not 0, so the first step's rollouts are not thrown away)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    n_params = sum(p.numel() for p in policy.parameters())
    try:
        engine = resolve_engine(cfg.engine, sampler)
    except ValueError as err:  # the continuous engine would drop Gemma-2's soft-capping
        raise SystemExit(str(err))
    log(f"model {cfg.model}: {n_params / 1e6:.1f}M parameters on {device}, compute {cdtype}, "
        f"reference model {'yes' if frozen is not None else 'no'}, engine {engine}")

    set_seed(cfg.seed)  # after loading: building the tiny model or initialising weights draws random numbers
    if rk == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    metrics_path, problems_path = os.path.join(cfg.out, "metrics.jsonl"), os.path.join(cfg.out, "problems.jsonl")
    if resume_from:
        opt_path = os.path.join(resume_from, "optimizer.pt")
        if os.path.exists(opt_path) and cfg.fsdp:
            load_sharded_optimizer(policy, optimizer, opt_path)
        elif os.path.exists(opt_path):
            optimizer.load_state_dict(load_pt(opt_path))
        else:  # only an explicit --resume_from of an older checkpoint gets here
            log(f"{resume_from} keeps no optimizer state: AdamW restarts from zero moments")
        scheduler.load_state_dict(state["scheduler"])
        pool = Pool(**state["pool"])
        set_rng_state(state["rng"])
        start = state["step"]
        log(f"resumed from {resume_from} at step {start}, pool of {len(pool.problems)}")
    else:
        for p in (metrics_path, problems_path) if rk == 0 else ():
            open(p, "w").close()
        pool = grow_starting_pool(sampler, frozen, tokenizer, cfg, log)
        if world > 1:  # every rank grew it alike; rank 0's copy makes the pools identical to the bit
            pool = Pool(**dist_call("broadcast_object_list", [pool.state()], 0)[0])
        start = 0
    if world > 1:
        log(f"{world} processes: rounds {cfg.rounds_per_step // world} per rank per step")

    # the state at the end of the last completed step: what Ctrl-C saves
    completed, snapshot, pool_len = start, rng_state(), len(pool.problems)
    final, guard = None, StepGuard()
    import signal
    # under torchrun, Ctrl-C reaches every rank (torchrun passes SIGINT on): rank 0 saves the last completed
    # step and exits, and torchrun then stops the others, which ignore it
    old_handler = signal.signal(signal.SIGINT, guard.handler if rk == 0 else signal.SIG_IGN)
    per = cfg.rounds_per_step // world
    mine = range(rk * per, (rk + 1) * per)  # this rank's rounds of every step
    try:
        for step in range(start + 1, cfg.steps + 1):
            timers, t_step = Counter(), time.perf_counter()
            # Every round of the step draws its references from, and compares diversity with, the pool as
            # it stood at the START of the step; the step's legal problems join it at the end, in round
            # order. The authors' released code grows the pool after every round (of every process); here
            # the pool grows once per step, as in the paper's Algorithm 1, so a round does not depend on
            # which rank played the rounds before it, and 1 and N processes run the same rollouts. Recipe
            # code's diversity is thus against the step-start pool plus the round's own candidates; recipe
            # paper's "pool before this step" is the same pool.
            step_pool = pool.embeddings
            played, rounds_refs = {}, []
            for rnd in range(cfg.rounds_per_step):
                set_seed(round_seed(cfg.seed, step, rnd))  # references and sampling: (seed, step, round) alone
                refs = [random.randrange(len(pool.problems)) for _ in range(cfg.n_refs)]
                rounds_refs.append([pool.problems[r] for r in refs])
                if rnd in mine:
                    played[rnd] = play_round(sampler, frozen, tokenizer, pool, refs, cfg, timers, step_pool)
            rounds_cands = share_rounds(played, cfg.rounds_per_step)  # every round, on every rank
            for cands in rounds_cands:
                add_to_pool(pool, cands, cfg)
            rounds, chosen, own = training_batch(rounds_cands, tokenizer, cfg, mine)
            rows = [row for rnd, (refs, cands, (groups, studs)) in enumerate(zip(rounds_refs, rounds_cands, chosen))
                    for row in problem_rows(step, rnd, refs, cands, groups if cfg.train_teacher else [], studs)]
            t0 = time.perf_counter()
            opt = optimise(policy, frozen, optimizer, scheduler, rounds, cfg, autocast_dtype, guard, own)
            if sampler is not policy:
                refresh_sampler(sampler, policy)
            timers["train"] += time.perf_counter() - t0
            timers["step"] = time.perf_counter() - t_step
            m = {**step_metrics(step, rounds_cands, rounds, chosen, pool, cfg, opt, timers), "ranks": world}  # sec/, tok_per_sec/: rank 0's
            if rk == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
                with open(problems_path, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
            log(f"step {step}/{cfg.steps} | teacher R {m['teacher/reward']:.3f} legal {m['teacher/legal_rate']:.0%}"
                f" | student R {m['student/reward']:.3f} | solve {m['solve_rate/mean']:.2f} in-band "
                f"{m['solve_rate/in_band']:.0%} | pool {m['pool']} | loss {m['loss']:+.4f} kl {m['kl']:.2e} "
                f"gnorm {m['grad_norm']:.3f} | {timers['step']:.1f}s")
            completed, snapshot, pool_len = step, rng_state(), len(pool.problems)
            guard.end()
            if step % cfg.save_every == 0 or step == cfg.steps:
                if world > 1:
                    log(f"pool {same_on_every_rank(pool, sampler if cfg.fsdp else policy)[:12]} and weights identical on all {world} ranks")
                full = full_training_state(policy, optimizer) if cfg.fsdp else None  # gathered on rank 0
                if rk == 0:  # every rank holds the same weights, optimizer state and pool; one writes them
                    final = save_checkpoint(cfg.out, step, policy, tokenizer, optimizer, scheduler, pool, snapshot, cfg, full)
                if world > 1:
                    dist_call("barrier")
    except KeyboardInterrupt:
        pool.truncate(pool_len)  # drop problems of the unfinished step; weights are still `completed`'s
        if cfg.fsdp and latest_checkpoint(cfg.out) != checkpoint_dir(cfg.out, completed):
            log(f"\ninterrupted: with --fsdp one rank cannot gather the sharded state, so step {completed} is not "
                f"saved; --resume continues from {latest_checkpoint(cfg.out) or 'the start'}")
        elif latest_checkpoint(cfg.out) != checkpoint_dir(cfg.out, completed):
            path = save_checkpoint(cfg.out, completed, policy, tokenizer, optimizer, scheduler, pool, snapshot, cfg)
            log(f"\ninterrupted: saved {path}; continue with --resume")
        else:
            log(f"\ninterrupted: step {completed} is already saved in {checkpoint_dir(cfg.out, completed)}; "
                "continue with --resume")
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGINT, old_handler)
    if _dist() is not None:
        _dist().destroy_process_group()
    return final or latest_checkpoint(cfg.out)


# --- command line: generated from Config, help text from its field comments ----------------------

def _field_help() -> dict:
    import inspect
    src = inspect.getsource(Config)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+): [^=]+=[^#\n]*#(.*)$", src, re.M)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="OpenSIR self-play training (arXiv 2511.00602). Every flag is "
                                "a Config field; --snake_case and --kebab-case both work.")
    helps = _field_help()
    types = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(Config):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        if f.type == "bool":
            p.add_argument(*names, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{helps.get(f.name, '')} (default: {f.default})")
        else:
            p.add_argument(*names, type=types[f.type], default=None, metavar=f.type.upper(),
                           help=f"{helps.get(f.name, '')} (default: {f.default})")
    return p


def config_from_args(argv: Optional[list] = None) -> Config:
    """Flags the user set win; then, for --model tiny, TINY_DEFAULTS (smaller numbers); then the --recipe
    preset (RECIPES, see recipe_preset); then Config's defaults."""
    args = vars(build_parser().parse_args(argv))
    given = {k: v for k, v in args.items() if v is not None}
    given = {**recipe_preset(given), **given}  # the preset fills what you and the tiny defaults leave open
    model = given.get("model", Config.model)
    defaults = SMALL_MODEL_DEFAULTS.get(model, {})
    tiny = {k: v for k, v in defaults.items() if k not in given}
    if tiny:
        print(f"{model} model defaults (override with flags): " + ", ".join(f"{k}={v}" for k, v in tiny.items()))
    return Config(**{**tiny, **given})


def main(argv: Optional[list] = None) -> None:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation
    if dist_env()[0]:  # under torchrun: one set of progress bars (rank 0's); the bars import tqdm.auto.tqdm
        import tqdm.auto

        class Quiet(tqdm.auto.tqdm):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, "disable": True})
        tqdm.auto.tqdm = Quiet
    cfg = config_from_args(argv)
    try:
        cfg.validate()
    except ValueError as err:
        raise SystemExit(str(err))
    try:
        train(cfg)
    except KeyboardInterrupt:  # before the first step (loading, starting pool): there is nothing to save
        raise SystemExit("\ninterrupted before the first step ended: nothing new was saved; the same command "
                         "starts again from where the last run left off") from None
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise SystemExit(f"disk full while writing {err.filename or cfg.out} ({err.strerror}). Free some space, "
                         f"then continue with --resume (the newest complete checkpoint: "
                         f"{latest_checkpoint(cfg.out)}).") from None


if __name__ == "__main__":
    try:
        main()
    except OSError as err:  # a model that cannot load: one clear line, not a traceback
        raise SystemExit(f"opensir.py: {err}") from None
