"""OpenSIR: Open-Ended Self-Improving Reasoner, in one file.

Kwan, Ong Jun Leang, Vougiouklis, Pan, Valentino, Minervini. arXiv 2511.00602 (2025).

One model plays two roles. As *teacher* it reads a problem from a growing pool and writes a new,
conceptually different one. As *student* it solves each new problem G times; the most common final
answer is the pseudo-label and the share of answers that agree with it is the problem's solve rate.
Both roles are trained together with GRPO on rewards the model computes itself: no labels.

Read top to bottom; the sections follow one round of the algorithm:
  1. config                      6. scoring a round (rewards -> selection -> pool)
  2. prompts and parsing         7. advantages
  3. answers (extract, compare)  8. log-probs and the GRPO loss
  4. rewards                     9. models (loading, the tiny model), checkpoints
  5. rollout (teacher, student) 10. the loop and main()
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

# ================================================================================================
# 1. Config
# ================================================================================================


@dataclass
class Config:
    """Every constant of the method. Defaults are the paper's recipe (authors' Llama-3.2-3B config)."""

    # run
    model: str = "tiny"  # short name (see MODELS), hub id, local path, or "tiny" (built in-process)
    out: str = "runs/opensir"  # output directory: checkpoints, metrics.jsonl, problems.jsonl
    resume: bool = False  # continue from the latest checkpoint in --out
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
    w_solv: float = 1.0  # weight of the solvability reward
    w_div: float = 1.0  # weight of the diversity reward
    w_len: float = 1.0  # weight of the solution-length reward
    w_teacher_format: float = 0.1  # weight of the teacher <think> format reward
    # student rewards
    w_correct: float = 1.0  # weight of agreeing with the majority answer
    w_student_format: float = 0.1  # weight of ending with the asked final-answer line
    # GRPO
    rounds_per_step: int = 16  # rounds (one teacher + one student group each) per optimiser step
    updates_per_rollout: int = 1  # optimiser steps on each batch of rollouts (mu)
    clip_eps: float = 0.2  # PPO clip range
    beta: float = 1e-4  # k3 KL weight against the frozen initial model (0: no reference model)
    adv_eps: float = 1e-4  # A = (R - mean) / (std + adv_eps)
    loss_agg: str = "token"  # "token" (authors) | "sequence" | "role" | "constant" (Dr. GRPO)
    lr: float = 3e-7  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 25  # linear warm-up, then constant
    max_grad_norm: float = 0.5  # gradient-norm clip
    # starting pool
    seed_problem: str = "What is 1+1?"  # the one problem the pool grows from
    init_pool_size: int = 512  # grow the starting pool to this many in-band problems (0: skip)
    init_pool_max_rounds: int = 2000  # give up growing the starting pool after this many rounds
    init_pool_min_chars: int = 30  # starting-pool filter: shortest problem kept
    init_pool: str = ""  # JSONL of a starting pool to load instead of growing one
    # compute
    device: str = "auto"  # "auto" (cuda if present), "cuda", "cpu"
    dtype: str = "auto"  # compute dtype for generation/autocast: "auto" (bf16 on cuda), "bf16", "fp32"
    attn: str = "auto"  # attention implementation; "auto": eager for Gemma-2 (soft-capping), else sdpa
    gen_batch: int = 256  # sequences per generate() call (halved on out-of-memory)
    train_micro_batch: int = 4  # sequences per forward/backward
    logprob_chunk: int = 1024  # tokens per lm_head/log-softmax chunk (no full-vocab tensor for the batch)
    grad_ckpt: bool = True  # gradient checkpointing (on cuda)
    random_init: bool = False  # random weights from the architecture in MODELS (no download)

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
                     "beta", "clip_eps", "lr", "init_pool_size", "warmup_steps", "max_grad_norm"):
            if getattr(self, name) < 0:
                errors.append(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            errors.append("--temperature must be > 0 (log-probs are divided by it)")
        if not 0 < self.top_p <= 1:
            errors.append(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.loss_agg not in LOSS_AGGS:
            errors.append(f"--loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")
        if self.div_embed not in ("center", "raw"):
            errors.append(f"--div_embed must be 'center' or 'raw', got {self.div_embed!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            errors.append(f"--dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            errors.append(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.init_pool and not os.path.exists(self.init_pool):
            errors.append(f"--init_pool {self.init_pool} does not exist")
        if errors:
            raise ValueError("invalid config:\n  " + "\n  ".join(errors))


LOSS_AGGS = ("token", "sequence", "role", "constant")

# The tiny model is for reading the code run on a laptop: same loop, smaller numbers. Applied only
# to fields the user did not set on the command line; printed at start.
TINY_DEFAULTS = dict(
    rounds_per_step=2, teacher_max_new_tokens=64, student_max_new_tokens=48, init_pool_size=4,
    init_pool_max_rounds=4, lr=1e-4, warmup_steps=0, save_every=1, beta=0.04, gen_batch=256,
    train_micro_batch=16,
)


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
    m = re.search(rf"<{name}>(.*?)</{name}>", text, re.DOTALL)
    return m.group(1) if m else None


@dataclass
class TeacherOutput:
    problem: Optional[str]  # text inside <problem>, stripped; None if absent
    concepts: list  # items of <concepts>, stripped
    has_think: bool  # a <think>...</think> block is present (format reward)
    legal: bool  # usable as a problem (see parse_teacher)


def parse_teacher(text: str) -> TeacherOutput:
    """Legal = non-empty <problem> of >= 10 chars (not just dots) and a one-line <concepts> list of
    1 to 3 comma-separated items, at least one of them >= 10 chars."""
    problem = _tag(text, "problem")
    problem = problem.strip() if problem is not None else None
    raw_concepts = _tag(text, "concepts")
    concepts = []
    concepts_ok = False
    if raw_concepts is not None and "\n" not in raw_concepts.strip():
        concepts = [c.strip() for c in raw_concepts.split(",") if c.strip()]
        concepts_ok = 1 <= len(concepts) <= 3 and any(len(c) >= 10 for c in concepts)
    problem_ok = problem is not None and len(problem) >= 10 and problem.strip(". \u2026") != ""
    return TeacherOutput(problem, concepts, _tag(text, "think") is not None, problem_ok and concepts_ok)


def has_final_line(solution: str) -> bool:
    """Student format: the last non-empty line is the asked 'Therefore, the final answer is' line."""
    lines = [ln.strip() for ln in solution.strip().splitlines() if ln.strip()]
    return bool(lines) and FINAL_LINE_RE.match(lines[-1]) is not None


# ================================================================================================
# 3. Answers: extraction, normalisation, equivalence
# ================================================================================================
# One source of truth for training (votes) and eval.py (accuracy).
# >>> ANSWERS SECTION (owned by the eval work; keep the three public names) >>>


def extract_boxed(text: str) -> Optional[str]:
    """Content of the first \\boxed{...} (balanced braces), or None."""
    start = text.find("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def normalize_answer(ans: Optional[str]) -> Optional[str]:
    """Canonical string used as the vote key: equal keys mean the same answer."""
    if ans is None:
        return None
    s = ans.strip().replace(" ", "")
    return s or None


def answers_equal(pred: Optional[str], gold: Optional[str]) -> bool:
    """Full checker used by eval.py."""
    a, b = normalize_answer(pred), normalize_answer(gold)
    return a is not None and a == b


# <<< ANSWERS SECTION <<<


# ================================================================================================
# 4. Rewards
# ================================================================================================


# ================================================================================================
# 5. Rollout: teacher and student
# ================================================================================================


# ================================================================================================
# 6. Scoring a round
# ================================================================================================


# ================================================================================================
# 7. Advantages
# ================================================================================================


# ================================================================================================
# 8. Log-probs and the GRPO loss
# ================================================================================================


# ================================================================================================
# 9. Models and checkpoints
# ================================================================================================


# >>> TINY MODEL SECTION (owned by the tiny-model work; keep build_tiny_model's signature) >>>


def build_tiny_model(path: str, seed: int = 0) -> None:
    """Build a tiny model + tokenizer, teach it the two output formats, save_pretrained to path."""
    raise NotImplementedError


# <<< TINY MODEL SECTION <<<


# ================================================================================================
# 10. The loop and main()
# ================================================================================================
