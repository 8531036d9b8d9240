"""The built-in tiny model behind `--model tiny`: a toy Llama and its tokenizer, built in-process.

models.py imports this module only when `--model tiny` or `toy` is asked for; nothing here is part of the
method. The prompts the models learn to answer and the cache directory come from the caller.
"""
from __future__ import annotations

import math
import os
import random
import re
import sys
from typing import Optional

import torch


# `--model tiny` runs the real loop on a laptop with no download. A randomly initialised model would
# never write a legal problem or a \boxed{} answer, so every round would be empty; instead we build a
# ~0.6M-parameter Llama and its tokenizer in-process and teach both output formats for ~30 s of CPU
# on procedurally generated arithmetic. It learns the formats well and the arithmetic only in part,
# so at temperature 1.0 its rounds hold legal and illegal problems, votes that partly agree
# (solve rates spread over [0, 1]) and therefore non-zero advantages.

TINY_VERSION = "1"  # part of the cache directory name: bump it whenever the recipe below changes
TINY_SPECIALS = dict(bos_token="<|bos|>", eos_token="<|eot|>", pad_token="<|pad|>")
TINY_TAGS = ["<think>", "</think>", "<problem>", "</problem>", "<concepts>", "</concepts>"]
# Every message is "<|role|>\n...<|eot|>\n"; <|eot|> ends a turn and is the EOS generation stops at.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eot|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TINY_ARCH = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=True)
TINY_TRAIN = dict(examples=3000, steps=250, student_batch=48, teacher_batch=8, lr=3e-3, warmup=20)
_TINY_NAMES = ["Ana", "Ben", "Mia", "Sam", "Zoe", "Leo"]
_TINY_ITEMS = ["apples", "books", "coins", "pens", "stickers", "marbles"]


def _tiny_problem(rng: random.Random) -> tuple:
    """A random arithmetic problem: (text, worked steps, answer, concepts). Small operands keep the
    facts few enough to half-learn in seconds; concepts come first-is-main, one of them >= 10 chars."""
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9)
    n, it = rng.choice(_TINY_NAMES), rng.choice(_TINY_ITEMS)
    return rng.choice([
        (f"What is {a} + {b}?", [f"{a} + {b} = {a + b}."], a + b, ["addition", "mental arithmetic"]),
        (f"What is {a} - {b}?", [f"{a} - {b} = {a - b}."], a - b, ["subtraction", "negative numbers"]),
        (f"What is {b} * {c}?", [f"{b} * {c} = {b * c}."], b * c, ["multiplication"]),
        (f"What is {b * c} / {c}?", [f"{b * c} / {c} = {b}."], b, ["division", "multiplication"]),
        (f"What is {a} + {b} * {c}?", [f"{b} * {c} = {b * c}.", f"{a} + {b * c} = {a + b * c}."],
         a + b * c, ["order of operations", "multiplication"]),
        (f"{n} has {a} {it} and gets {b} more. How many {it} does {n} have now?",
         [f"{a} + {b} = {a + b}."], a + b, ["word problems", "addition"]),
        (f"{n} has {b} bags with {c} {it} in each. How many {it} are there?", [f"{b} * {c} = {b * c}."],
         b * c, ["word problems", "multiplication"]),
        (f"What is the remainder when {a * c + b % c} is divided by {c}?",
         [f"{a * c + b % c} = {c} * {a} + {b % c}."], b % c, ["remainders", "division"]),
        (f"What is {b} squared?", [f"{b} * {b} = {b * b}."], b * b, ["exponents", "perfect squares"]),
        (f"What is {c * 10}% of {b * 10}?", [f"{c * 10}% of {b * 10} = {c} * {b} = {c * b}."], c * b,
         ["percentages", "multiplication"]),
    ])


def _tiny_examples(rng: random.Random, prompts: tuple) -> list:
    """One teacher and one student example, as (user text, assistant completion) pairs."""
    ref = ("What is 1+1?", None, None, ["addition"]) if rng.random() < 0.2 else _tiny_problem(rng)
    new = _tiny_problem(rng)
    while new[3][0] == ref[3][0]:  # "conceptually different": another main concept than the reference
        new = _tiny_problem(rng)
    think = f"<think>That problem uses {ref[3][0]}. Mine needs {new[3][0]} instead.</think>\n"
    concepts = f"\n<concepts>{', '.join(new[3])}</concepts>"
    style = rng.random()  # ~10% without <think> (legal, no format reward), ~10% illegal concepts
    teacher = ((think if style >= 0.1 else "") + f"<problem>{new[0]}</problem>"
               + (concepts if style < 0.9 else f"\n<concepts>{new[3][0][:4]}</concepts>"))
    student = "\n".join(new[1]) + f"\nTherefore, the final answer is: $\\boxed{{{new[2]}}}$"
    teacher_prompt, student_prompt = prompts
    return [(teacher_prompt(ref[0]), teacher), (student_prompt(new[0]), student)]


def _tiny_tokenizer(texts: list):
    """Byte-level BPE, so any text round-trips (unicode, LaTeX). Merges may cross word boundaries, so
    each fixed instruction shrinks to a few tokens (cheap on CPU); a run of digits is split from its
    neighbours, so small numbers become single tokens (one fact = one token to learn); the tags are
    whole tokens, so no token straddles a tag boundary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    specials = [*TINY_SPECIALS.values(), "<|system|>", "<|user|>", "<|assistant|>"]
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in TINY_TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=TINY_CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False, **TINY_SPECIALS)


def _tiny_batch(seqs: list, pad_id: int) -> tuple:
    """Right-padded (input_ids, attention_mask, labels); labels are -100 except on completion tokens."""
    from torch.nn.utils.rnn import pad_sequence
    ids = pad_sequence([torch.tensor(p + c) for p, c in seqs], batch_first=True, padding_value=pad_id)
    mask = pad_sequence([torch.ones(len(p) + len(c), dtype=torch.long) for p, c in seqs], batch_first=True)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(seqs):
        labels[i, len(p): len(p) + len(c)] = torch.tensor(c)
    return ids, mask, labels


def build_tiny_model(path: str, prompts: tuple, seed: int = 0) -> None:
    """Build a tiny model + tokenizer, teach it the two output formats, save_pretrained to path.
    prompts: the (teacher_prompt, student_prompt) functions of opensir.py, whose outputs it learns to answer.
    Deterministic given the seed; leaves the caller's RNG and thread settings as they were."""
    _build(path, seed, _tiny_examples, TINY_ARCH, TINY_TRAIN, prompts)


def _build(path: str, seed: int, examples, arch: dict, hp: dict, prompts: tuple) -> None:
    """Shared by the tiny and the toy model: examples(rng, prompts) gives (user text, completion) pairs."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    rng = random.Random(seed)
    pairs = [p for _ in range(hp["examples"]) for p in examples(rng, prompts)]
    # the corpus is the training text itself, chat-formatted as TINY_CHAT_TEMPLATE renders it
    tok = _tiny_tokenizer([f"<|bos|><|user|>\n{p}<|eot|>\n<|assistant|>\n{c}<|eot|>\n"
                           for p, c in pairs[:2000]])
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p, _ in pairs]  # as opensir.chat renders a prompt
    prompt_ids = tok(chats, add_special_tokens=False)["input_ids"]
    completions = tok([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    seqs = [(p, c + [tok.eos_token_id]) for p, c in zip(prompt_ids, completions)]  # learn to stop
    roles = [seqs[0::2], seqs[1::2]]  # teacher, student: one-role batches pad less (lengths differ)
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        # One thread: deterministic whatever the caller set, and immune to the collapse a 2-thread
        # team suffers when another process holds a core; these matmuls gain little from more.
        torch.set_num_threads(1)
        torch.manual_seed(seed)
        try:
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, **arch))
            opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], betas=(0.9, 0.98), weight_decay=0.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / hp["warmup"]) * (
                0.1 + 0.45 * (1 + math.cos(math.pi * s / hp["steps"]))))  # warm-up, cosine to 10%
            model.train()
            for _ in range(hp["steps"]):
                loss = 0.0
                for role, n in zip(roles, (hp["teacher_batch"], hp["student_batch"])):
                    ids, mask, labels = _tiny_batch([role[rng.randrange(len(role))] for _ in range(n)],
                                                    tok.pad_token_id)
                    loss = loss + model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
        finally:
            torch.set_num_threads(threads)
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def tiny_model_path(root: str, seed: int = 0) -> str:
    """The tiny model's cache directory: <root>/tiny-v<VERSION>-seed<seed> (root: models.cache_root())."""
    return os.path.join(root, f"tiny-v{TINY_VERSION}-seed{seed}")


def ensure_tiny_model(prompts: tuple, root: str, seed: int = 0) -> str:
    """The tiny model's directory, built on first use."""
    return _ensure_built(tiny_model_path(root, seed), lambda p, s: build_tiny_model(p, prompts, s), seed,
                         "tiny model (once, ~30 s)")


def _ensure_built(path: str, build, seed: int, what: str) -> str:
    """path, built by build(tmp, seed) on first use. Built in a temporary directory and renamed
    into place, so a crash never leaves a half-built model that later runs would load."""
    import shutil
    import tempfile
    if not os.path.exists(os.path.join(path, "config.json")):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"preparing the {what} in {path}", file=sys.stderr)
        tmp = tempfile.mkdtemp(prefix=".tiny-building-", dir=os.path.dirname(path))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished cache need not be
        try:
            build(tmp, seed)
            mask = os.umask(0)
            os.umask(mask)
            for name in os.listdir(tmp):  # safetensors writes 0600: the shared cache gets the usual permissions
                os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
            os.replace(tmp, path)
        except OSError:  # another process renamed its copy into place first: use that one
            if not os.path.exists(os.path.join(path, "config.json")):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# ------------------------------------------------------------------------------------------------
# The toy world behind `--model toy`: a difficulty ladder where the vote knows more than the first guess.
# ------------------------------------------------------------------------------------------------
# The tiny model above is for reading the loop; it has almost no head-room. The toy world is for showing
# learning: five rungs of arithmetic, each a chain of one to three one-fact steps written out, where
# label-free rewards have something to learn. Real models on maths gain from self-consistency (the
# majority of sampled answers beats the greedy one); the toy world is built to be in that regime:
# - several correct solution paths per problem: an order of the operands (a + b or b + a), a grouping of a
#   sum, the product written either way round; the problem's own left-to-right order is the most common
#   in pre-training, so greedy decoding takes it;
# - weak facts: TOY_WEAK of the ordered facts ("x op y", hashed) were mostly taught wrong, a fixed
#   misconception (off by 1 to 3) more often than the right result, so the model's mode is wrong on them.
#   A fact is weak in one order and usually fine in the other, so where greedy's path meets a weak fact
#   the other paths still reach the right answer, and the majority of samples is right where greedy is
#   wrong. Rare slips (TOY_SLIP, off by 1 to 9, carried on) make the rest of the noise.
# demo.py gate measures it before any training (docs/toy-world.md). Version 1 (sums of products; hundreds
# of two-digit facts never learned) and version 2 (one path, random slips: the mode was already the
# majority answer, so voting could only sharpen) did not show label-free learning (docs/toy-world.md).
# Problems are split by a hash of their text into train / dev / held-out; the builder and every
# training path draw only "train" problems.

TOY_VERSION = "3"  # part of the cache directory name: bump it whenever the recipe below changes
TOY_ARCH = dict(TINY_ARCH, num_hidden_layers=3)  # one more layer: copying an intermediate result
TOY_TRAIN = dict(examples=36000, steps=3000, student_batch=48, teacher_batch=8, lr=3e-3, warmup=20)
TOY_SLIP = 0.02  # chance that a step of a strong fact carries a wrong result (a slip, off by 1 to 9)
TOY_WEAK = 0.20  # share of ordered facts "x op y" that are weak (chosen by a hash of the fact)
TOY_WEAK_RIGHT, TOY_WEAK_MISCONCEPTION = 0.35, 0.45  # a weak fact's right result, its fixed wrong one; else a slip
TOY_FIRST_ORDER = 0.6  # one-fact rungs and each step of rung 3: the written order first; else swapped
TOY_RUNGS = [  # (main concept, second concept); the rung is the index
    ("single-digit addition", "addition"),
    ("multiplication facts", "multiplication"),
    ("adding three numbers", "multi-step arithmetic"),
    ("parentheses", "multi-step arithmetic"),
    ("adding four numbers", "multi-step arithmetic"),
]
TOY_SPLITS = ("train", "dev", "heldout")
_TOY_RE = [  # the problem text of each rung, for toy_rung()
    re.compile(r"^What is (\d+) \+ (\d+)\?$"),
    re.compile(r"^What is (\d+) \* (\d+)\?$"),
    re.compile(r"^What is (\d+) \+ (\d+) \+ (\d+)\?$"),
    re.compile(r"^What is \((\d+) \+ (\d+)\) \* (\d+)\?$"),
    re.compile(r"^What is (\d+) \+ (\d+) \+ (\d+) \+ (\d+)\?$"),
]


def toy_problem(rng: random.Random, rung: int) -> tuple:
    """A problem of the given rung: (text, worked steps, answer)."""
    a, b, c, d = (rng.randint(2, 9) for _ in range(4))
    if rung == 0:
        return f"What is {a} + {b}?", [f"{a} + {b} = {a + b}."], a + b
    if rung == 1:
        return f"What is {a} * {b}?", [f"{a} * {b} = {a * b}."], a * b
    if rung == 2:
        return f"What is {a} + {b} + {c}?", [f"{a} + {b} = {a + b}.", f"{a + b} + {c} = {a + b + c}."], a + b + c
    if rung == 3:
        return (f"What is ({a} + {b}) * {c}?", [f"{a} + {b} = {a + b}.", f"{a + b} * {c} = {(a + b) * c}."],
                (a + b) * c)
    return (f"What is {a} + {b} + {c} + {d}?",
            [f"{a} + {b} = {a + b}.", f"{a + b} + {c} = {a + b + c}.", f"{a + b + c} + {d} = {a + b + c + d}."],
            a + b + c + d)


def _hash(text: str) -> int:
    """A fixed hash of a text (the first 32 bits of its SHA-256): splits, weak facts, misconceptions."""
    import hashlib
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def toy_split(text: str) -> str:
    """train (80%), dev (10%) or heldout (10%), from a hash of the problem text: fixed forever."""
    h = _hash(text) % 10
    return "heldout" if h == 0 else "dev" if h == 1 else "train"


def toy_rung(text: Optional[str]) -> Optional[int]:
    """The rung of a problem text written in the toy world's templates, else None (off-template)."""
    for i, pat in enumerate(_TOY_RE):
        if text is not None and pat.match(text.strip()):
            return i
    return None


def toy_answer(text: str) -> Optional[int]:
    """The true answer of a toy-template problem (None off-template): for diagnostics and evaluation."""
    r = toy_rung(text)
    if r is None:
        return None
    n = [int(x) for x in _TOY_RE[r].match(text.strip()).groups()]
    if r <= 1:
        return n[0] + n[1] if r == 0 else n[0] * n[1]
    return sum(n) if r in (2, 4) else (n[0] + n[1]) * n[2]


def toy_draw(rng: random.Random, split: str = "train", rungs: Optional[list] = None) -> tuple:
    """A problem of the split (rejection on toy_split), rung uniform over `rungs` (default: all)."""
    rungs = list(range(len(TOY_RUNGS))) if rungs is None else rungs
    while True:
        rung = rng.choice(rungs)
        p = toy_problem(rng, rung)
        if toy_split(p[0]) == split:
            return p + (rung,)


def toy_problem_set(split: str, n_per_rung: int, seed: int, rungs: Optional[list] = None) -> list:
    """n_per_rung distinct problems of each rung from the split: [(text, answer, rung)]. Held-out and
    dev sets use their own seeds; the split already keeps them out of every training draw."""
    rng = random.Random(f"toy-{split}-{seed}")
    out = []
    for rung in (range(len(TOY_RUNGS)) if rungs is None else rungs):
        seen, stale = set(), 0
        while len(seen) < n_per_rung and stale < 300:  # a small rung runs out of problems: stop there
            text, _, ans, _ = toy_draw(rng, split, [rung])
            stale += 1
            if text not in seen:
                seen.add(text)
                out.append((text, ans, rung))
                stale = 0
    return out


def _result(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x * y


def toy_weak(x: int, op: str, y: int) -> bool:
    """Is the ordered fact "x op y" weak (mostly taught wrong)? Fixed by a hash: TOY_WEAK of all facts."""
    return _hash(f"weak {x} {op} {y}") % 100 < round(100 * TOY_WEAK)


def toy_misconception(x: int, op: str, y: int) -> int:
    """The wrong result a weak fact is mostly taught with: off by 1 to 3, fixed per fact, never below 0."""
    r, d = _result(x, op, y), 1 + _hash(f"mis {x} {op} {y}") % 3
    return r + d if (_hash(f"sign {x} {op} {y}") % 2 or r - d < 0) else r - d


def _fact(x: int, op: str, y: int, rng: random.Random) -> int:
    """A pre-training result of "x op y": a weak fact is right with TOY_WEAK_RIGHT, its misconception with
    TOY_WEAK_MISCONCEPTION, else a slip; a strong fact slips with TOY_SLIP."""
    r, u = _result(x, op, y), rng.random()
    if toy_weak(x, op, y):
        if u < TOY_WEAK_RIGHT:
            return r
        if u < TOY_WEAK_RIGHT + TOY_WEAK_MISCONCEPTION:
            return toy_misconception(x, op, y)
    elif u >= TOY_SLIP:
        return r
    return max(0, r + rng.choice([-1, 1]) * rng.randint(1, 9)) or r + rng.randint(1, 9)


def _toy_path(rung: int, rng: random.Random) -> list:
    """A solution path: its steps as (x, op, y), each x, y an operand's index or "r" (the previous result).
    The problem's left-to-right order is the most common path (greedy's); the others are as right."""
    u = rng.random()
    if rung in (0, 1):
        op = "+" if rung == 0 else "*"
        return [(0, op, 1)] if u < TOY_FIRST_ORDER else [(1, op, 0)]
    if rung == 2:  # (a + b) + c half the time; (b + c) + a and (a + c) + b a quarter each
        return [[(0, "+", 1), ("r", "+", 2)], [(1, "+", 2), ("r", "+", 0)], [(0, "+", 2), ("r", "+", 1)]][
            0 if u < 0.5 else 1 if u < 0.75 else 2]
    if rung == 3:  # (a + b) * c: either order of the sum, then either order of the product
        first = (0, "+", 1) if u < TOY_FIRST_ORDER else (1, "+", 0)
        return [first, ("r", "*", 2) if rng.random() < TOY_FIRST_ORDER else (2, "*", "r")]
    order = [0, 1, 2, 3] if u < 0.5 else rng.sample([0, 1, 2, 3], 4)  # left to right half the time
    return [(order[0], "+", order[1]), ("r", "+", order[2]), ("r", "+", order[3])]


def _worked(text: str, rung: int, rng: random.Random) -> tuple:
    """A pre-training solution of a toy problem: a path (_toy_path) whose every step's result is drawn by
    _fact, later steps computing from the previous (perhaps wrong) result, as a person carries on.
    Returns (steps, answer)."""
    n = [int(x) for x in _TOY_RE[rung].match(text).groups()]
    steps, r = [], None
    for xs, op, ys in _toy_path(rung, rng):
        x, y = (r if k == "r" else n[k] for k in (xs, ys))
        r = _fact(x, op, y, rng)
        steps.append(f"{x} {op} {y} = {r}.")
    return steps, r


def _toy_examples(rng: random.Random, prompts: tuple) -> list:
    """One teacher and one student example, as (user text, assistant completion) pairs, train split only.
    The teacher writes a problem of another rung than its reference, uniformly: RL has to learn which."""
    if rng.random() < 0.2:
        ref, ref_rung = "What is 1+1?", None
    else:
        ref, _, _, ref_rung = toy_draw(rng)
    text, steps, ans, rung = toy_draw(rng, rungs=[r for r in range(len(TOY_RUNGS)) if r != ref_rung])
    main, second = TOY_RUNGS[rung]
    think = (f"<think>That problem uses {TOY_RUNGS[ref_rung][0] if ref_rung is not None else 'addition'}. "
             f"Mine needs {main} instead.</think>\n")
    style = rng.random()  # ~10% without <think> (legal, no format reward), ~10% illegal concepts
    teacher = ((think if style >= 0.1 else "") + f"<problem>{text}</problem>"
               + (f"\n<concepts>{main}, {second}</concepts>" if style < 0.9 else f"\n<concepts>{main[:4]}</concepts>"))
    steps, ans = _worked(text, rung, rng)
    student = "\n".join(steps) + f"\nTherefore, the final answer is: $\\boxed{{{ans}}}$"
    teacher_prompt, student_prompt = prompts
    return [(teacher_prompt(ref), teacher), (student_prompt(text), student)]


def build_toy_model(path: str, prompts: tuple, seed: int = 0) -> None:
    """Build the toy-world model (TOY_ARCH, TOY_TRAIN) and save_pretrained to path. Deterministic."""
    _build(path, seed, _toy_examples, TOY_ARCH, TOY_TRAIN, prompts)


def toy_model_path(root: str, seed: int = 0) -> str:
    """The toy model's cache directory: <root>/toy-v<VERSION>-seed<seed> (root: models.cache_root())."""
    return os.path.join(root, f"toy-v{TOY_VERSION}-seed{seed}")


# The built toy model of seed 0 ships with the project (3 MB): a build on another machine (another CPU,
# another torch) need not be bit-identical, and the figures in docs/toy-world.md come from these weights.
TOY_SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", f"toy-v{TOY_VERSION}-seed0")
TOY_SHIPPED_SHA256 = {  # every file of TOY_SHIPPED; a copy whose bytes differ is not used
    "chat_template.jinja": "d4720d8989d64d09167022bd8b21f8c2cda7f898cd3d2726208c96ad71fb5ce4",
    "config.json": "567f12bc7728f925b29feb539bbb1ba85b8420b361eef111914f39eec858abb6",
    "generation_config.json": "59f7814408c393a65c63ddb43e70d5a555cae20ee5a6baa638034a404a80ebd0",
    "model.safetensors": "ef1e1feb1d1e6dafc5387189d2c20545ad9f325ae7bd84fc96dcc0cbb0f53262",
    "tokenizer.json": "90fdc2c07d7427e3aaf5a933ead9d5c059ee8908be84e71316264e3648990324",
    "tokenizer_config.json": "378333163ce004c6d23259e8f4330ef032e6079c9bf27c92d53907a0e1959793",
}


def _sha256(path: str) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def shipped_toy_intact() -> bool:
    """Are the shipped toy weights all there, byte for byte as recorded?"""
    try:
        return all(_sha256(os.path.join(TOY_SHIPPED, f)) == h for f, h in TOY_SHIPPED_SHA256.items())
    except OSError:
        return False


def ensure_toy_model(prompts: tuple, root: str, seed: int = 0) -> str:
    """The toy model's directory. Seed 0: a copy of the shipped weights when they are intact, else built
    (and said whether the build equals the shipped bytes). Other seeds: built on first use (about 15
    minutes on one CPU thread)."""
    def build(tmp: str, s: int) -> None:
        import shutil
        if s == 0 and shipped_toy_intact():
            for f in TOY_SHIPPED_SHA256:
                shutil.copyfile(os.path.join(TOY_SHIPPED, f), os.path.join(tmp, f))
            return
        build_toy_model(tmp, prompts, s)
        if s == 0:
            same = _sha256(os.path.join(tmp, "model.safetensors")) == TOY_SHIPPED_SHA256["model.safetensors"]
            print(f"the shipped toy weights are missing or damaged; this build is {'bit-identical to' if same else 'NOT the same as'} "
                  "the shipped one" + ("" if same else ", so the figures in docs/toy-world.md will not reproduce "
                  "exactly"), file=sys.stderr)
    return _ensure_built(toy_model_path(root, seed), build, seed,
                         "toy-world model (seed 0: the shipped weights; else once, ~15 min)")
