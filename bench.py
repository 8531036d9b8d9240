"""Speed of the two engines (`--engine generate` / `continuous`), side by side in one run.

Two modes. `--mode gen` (default): generation alone, per phase, at the paper's shapes. `--mode step`:
the whole GRPO step on CPU (sample P prompts x G completions, score them, one AdamW update through
opensir.optimise with the frozen reference's KL term) for the tiny and toy models and a ~29M-parameter
shape, per thread count, the engines alternating round by round (A, B, A, B, ...). `--mode trl` runs the
same workload through TRL's GRPOTrainer (needs `pip install trl`), and `--mode compare` alternates whole
processes of the project (both engines) and of TRL, so the three see the same machine load.

    python bench.py --mode step --models tiny,toy,cpu-29m --threads 1,2 --rounds 5
    python bench.py --mode compare --python_trl /work/venv-trl/bin/python --threads 1,2 --processes 3
    python bench.py --device cuda            # gemma-2-2b-it and llama-3.2-3b-instruct shapes (about 8 min on an H200; README)
    python bench.py --device cpu             # a ~29M-parameter Llama on CPU at the student phase's shape
    python bench.py --device cpu --smoke     # seconds: what the tests run

Random weights (`--random_init` architectures, no download). Random weights sample near-uniform
tokens and would never end a completion, so `length_spread_eos` declares vocab/L token ids end-of-turn:
completions then end after a geometric number of tokens with mean about L, varying several-fold as
real ones do (the padding `generate` pays for and `continuous` avoids). Both engines get the same
prompts, EOS list, sampler (temperature 1, top-k 50) and budgets; rounds alternate engines.

Printed per model, engine and phase: seconds, generated tokens (each up to and including its EOS),
tokens/s, peak GPU memory, the decode roofline and the fraction of it reached, and the generation
hours for the paper's 200 steps, extrapolated from the measured tokens/s (stated as such).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time

import torch

import engines
import models
import opensir as O
from engines import auto_engine

# Peak memory bandwidth (bytes/s) by a substring of torch.cuda.get_device_name(); --bandwidth_tbs overrides.
BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12),
             ("A100 80GB PCIe", 1.94e12), ("A100", 1.56e12), ("L40S", 0.864e12), ("A10G", 0.6e12),
             ("RTX 4090", 1.0e12)]

# The CPU model: big enough that the model, not Python, dominates a decode step (tens of millions).
CPU_ARCH = dict(model_type="llama", vocab_size=8192, hidden_size=512, intermediate_size=1536,
                num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                hidden_act="silu", max_position_embeddings=4096, tie_word_embeddings=True)
SMOKE_ARCH = dict(CPU_ARCH, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)

# The paper's step: 16 rounds x (4 references x 8 teacher samples; up to 32 problems x 8 solutions).
PAPER_STEPS, PAPER_TEACHER_SAMPLES, PAPER_STUDENT_SAMPLES = 200, 16 * 4 * 8, 16 * 32 * 8


def build(name: str, device: str, seed: int):
    """(model, tokenizer) with random weights, built on the device directly (no CPU detour for 3B)."""
    if name in models.ARCHITECTURES:
        with torch.device(device if device == "cuda" else "cpu"):
            return O.load_model(name, device=device, random_init=True, seed=seed)
    from transformers import AutoConfig, AutoModelForCausalLM
    arch = dict(CPU_ARCH if name == "cpu-29m" else SMOKE_ARCH)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0  # synthetic_tokenizer's
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=models.compute_dtype(torch.device(device)),
                                             attn_implementation="sdpa")
    return model.to(device).eval(), models.synthetic_tokenizer(config.vocab_size)


def length_spread_eos(model, tokenizer, mean_len: int) -> list:
    """Declare about vocab/mean_len token ids end-of-turn (random weights: near-uniform sampling), so a
    completion's length is geometric with mean ~mean_len. Returns the EOS list, set on the model."""
    vocab = model.config.get_text_config().vocab_size
    k = max(1, round(vocab / mean_len))
    ids = sorted({tokenizer.eos_token_id, *range(vocab - k + 1, vocab)})
    model.generation_config.eos_token_id = ids
    return ids


def prompts_for(tokenizer, n_problems: int, samples: int, words: tuple, seed: int) -> list:
    """n_problems chat prompts of `words` random words each, every one repeated `samples` times."""
    import random
    rng = random.Random(seed)
    vocab = len(tokenizer)
    out = []
    for _ in range(n_problems):
        text = " ".join(f"w{rng.randrange(6, vocab)}" for _ in range(rng.randint(*words)))
        out += [O.chat(tokenizer, text)] * samples
    return out


def bandwidth(device: str, override_tbs: float) -> tuple:
    if override_tbs > 0:
        return override_tbs * 1e12, "--bandwidth_tbs"
    if device != "cuda":
        return None, "cpu (pass --bandwidth_tbs)"
    name = torch.cuda.get_device_name()
    for key, bw in BANDWIDTH:
        if key in name:
            return bw, name
    return None, f"{name} (unknown: pass --bandwidth_tbs)"


def roofline_tps(model, comps: list, bw: float) -> float:
    """Decode roofline: with every sequence of the phase in one batch, a step reads the bf16 weights once
    and each sequence's KV at its mean context (prompt + half its completion); tokens/s = B*bw/bytes."""
    import engines
    weight_bytes = 2 * sum(p.numel() for p in model.parameters())
    kv = engines.kv_bytes_per_token(model, torch.bfloat16)
    context = statistics.mean(len(c.prompt_ids) + len(c.ids) / 2 for c in comps)
    return len(comps) * bw / (weight_bytes + len(comps) * context * kv)


def sample(model, tok, prompts: list, max_new: int, engine: str, batch_size: int, kv_cache_gib: float = 0.0,
           sampling=None, seed: int = 0) -> list:
    """opensir.generate through the named engine at T 1.0, top-k 50 (the training settings), one seed a prompt."""
    import engines
    eng = engines.make_engine(engine, model, O.eos_token_ids(model, tok), tok.pad_token_id, batch_size, kv_cache_gib,
                              log=lambda *a, **k: None)
    return O.generate(eng, tok, prompts, max_new, sampling or engines.Sampling(1.0, 50, 1.0),
                      [seed + i for i in range(len(prompts))])


def run_phase(model, tok, prompts, max_new, engine, args) -> tuple:
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    comps = sample(model, tok, prompts, max_new, engine, args.gen_batch, args.kv_cache_gib, seed=args.seed)
    if args.device == "cuda":
        torch.cuda.synchronize()
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0  # CPU time of all threads
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak RSS)
    return comps, secs, cpu, peak


def bench_model(name: str, args) -> list:
    model, tok = build(name, args.device, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    eos = length_spread_eos(model, tok, args.mean_len)
    phases = {"teacher": (prompts_for(tok, args.teacher_prompts, 1, (20, 40), args.seed), args.teacher_max_new),
              "student": (prompts_for(tok, args.student_problems, 8, (30, 90), args.seed + 1), args.student_max_new)}
    bw, bw_name = bandwidth(args.device, args.bandwidth_tbs)
    print(f"\n{name}: {n_params / 1e6:.1f}M parameters on {args.device}, {len(eos)} EOS ids (mean length "
          f"~{args.mean_len}), bandwidth {bw / 1e12 if bw else float('nan'):.2f} TB/s ({bw_name})")
    rows, ok = [], []
    for engine in args.engines:
        try:
            engines.resolve_engine(engine, model)
        except ValueError as err:
            print(f"  {engine}: refused: {err}")
            rows.append(dict(model=name, engine=engine, refused=str(err)))
            continue
        torch.manual_seed(args.seed)
        sample(model, tok, phases["teacher"][0][:2], 4, engine, 2)  # warm-up
        ok.append(engine)
    for phase, (prompts, max_new) in phases.items():
        runs = {e: [] for e in ok}
        for r in range(args.rounds):  # engines alternate within a round: a busy machine slows both alike
            for engine in ok:
                torch.manual_seed(args.seed + r)
                runs[engine].append(run_phase(model, tok, prompts, max_new, engine, args))
        for engine in ok:
            tps = [sum(len(c.ids) for c in comps) / secs for comps, secs, _, _ in runs[engine]]
            cps = [sum(len(c.ids) for c in comps) / cpu for comps, _, cpu, _ in runs[engine]]
            toks = [sum(len(c.ids) for c in comps) for comps, _, _, _ in runs[engine]]
            se = statistics.stdev(tps) / math.sqrt(len(tps)) if len(tps) > 1 else float("nan")
            peak = max(pk for _, _, _, pk in runs[engine])
            row = dict(model=name, engine=engine, phase=phase, sequences=len(prompts), max_new_tokens=max_new,
                       seconds=statistics.mean(s for _, s, _, _ in runs[engine]), tokens=statistics.mean(toks),
                       tokens_per_s=statistics.mean(tps), tokens_per_s_se=se, tokens_per_cpu_s=statistics.mean(cps),
                       peak_gib=peak, mean_len=statistics.mean(toks) / len(prompts), rounds=args.rounds,
                       per_round_tps=tps, per_round_cps=cps)
            if bw:
                row["roofline_tps"] = roofline_tps(model, runs[engine][-1][0], bw)
                row["roofline_frac"] = row["tokens_per_s"] / row["roofline_tps"]
            rows.append(row)
            print(f"  {engine:10s} {phase:7s} {len(prompts):4d} seqs x <= {max_new:4d}: {row['seconds']:7.2f} s  "
                  f"{row['tokens']:7.0f} tok  {row['tokens_per_s']:8.1f} +- {se:5.1f} tok/s  "
                  f"({row['tokens_per_cpu_s']:.1f} per CPU-s)  peak {peak:6.2f} GiB"
                  + (f"  roofline {row['roofline_tps']:9.0f} tok/s ({row['roofline_frac']:.1%})" if bw else ""))
    for engine in ok:
        by = {r["phase"]: r for r in rows if r.get("engine") == engine and "phase" in r}
        step_s = (PAPER_TEACHER_SAMPLES * args.paper_teacher_len / by["teacher"]["tokens_per_s"]
                  + PAPER_STUDENT_SAMPLES * args.paper_student_len / by["student"]["tokens_per_s"])
        hours = PAPER_STEPS * step_s / 3600
        rows.append(dict(model=name, engine=engine, paper_hours_generation=hours))
        print(f"  {engine:10s} extrapolated: {PAPER_STEPS} paper steps ({PAPER_TEACHER_SAMPLES} teacher x "
              f"{args.paper_teacher_len} + {PAPER_STUDENT_SAMPLES} student x {args.paper_student_len} tokens each) "
              f"~ {hours:.1f} h of generation at the tokens/s above (training time not included)")
    if len(ok) == 2:  # paired by round: both engines ran it back to back on the same machine load
        for phase in phases:
            a, b = ([r for r in rows if r.get("engine") == e and r.get("phase") == phase][0] for e in ok)
            for key, what in (("tps", "tokens/s"), ("cps", "tokens per CPU-second")):
                ratio = [y / x for x, y in zip(a["per_round_" + key], b["per_round_" + key])]
                se = statistics.stdev(ratio) / math.sqrt(len(ratio)) if len(ratio) > 1 else float("nan")
                rows.append(dict(model=name, phase=phase, ratio=f"{ok[1]}/{ok[0]} {what}",
                                 mean=statistics.mean(ratio), se=se, per_round=ratio))
                print(f"  {phase}: {ok[1]} / {ok[0]} {what} = {statistics.mean(ratio):.2f} +- {se:.2f} "
                      f"(per round: {', '.join(f'{x:.2f}' for x in ratio)})")
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows

# --- the whole step on CPU --------------------------------------------------------------------------

# Per model: problems x G completions an optimiser step, max_new_tokens, and (random weights only) the mean
# completion length the EOS set aims at. tiny/toy: the built-in trained models and their own EOS, student
# prompts of their own problems; their completions run about 10-20 tokens.
STEP_SHAPES = {"tiny": (16, 8, 48, None), "toy": (16, 8, 64, None), "cpu-29m": (4, 8, 128, 64),
               "smoke": (2, 4, 8, 4)}
STEP_CONFIG = dict(beta=0.04, lr=1e-5, train_micro_batch=16, updates_per_rollout=1, loss_agg="token",
                   temperature=1.0, top_k=50, top_p=1.0, gen_batch=256)  # the tiny model's defaults


def step_prompts(name: str, tok, n_problems: int, group: int, seed: int) -> list:
    """n_problems student prompts, each repeated `group` times: the model's own kind of problem."""
    import random
    import tiny
    rng = random.Random(f"bench-{name}-{seed}")
    if name == "tiny":
        texts = [tiny._tiny_problem(rng)[0] for _ in range(n_problems)]
    elif name == "toy":
        texts = [tiny.toy_problem(rng, rng.randrange(len(tiny.TOY_RUNGS)))[0] for _ in range(n_problems)]
    else:
        return prompts_for(tok, n_problems, group, (30, 90), seed)
    return [O.chat(tok, O.student_prompt(t)) for t in texts for _ in range(group)]


def step_workload(name: str, args) -> dict:
    """Policy (fp32, trained), frozen reference, tokenizer, prompts and budget of one model's step."""
    import copy
    n_problems, group, max_new, mean_len = STEP_SHAPES[name]
    max_new = args.max_new_tokens or max_new
    if name in ("tiny", "toy"):
        policy, tok = O.load_model(name, device="cpu", dtype="fp32")
    else:
        policy, tok = build(name, "cpu", args.seed)
        length_spread_eos(policy, tok, args.mean_len or mean_len)
    frozen = copy.deepcopy(policy).requires_grad_(False).eval()
    cfg = O.Config(**{**STEP_CONFIG, "teacher_max_new_tokens": max_new, "student_max_new_tokens": max_new})
    return dict(name=name, policy=policy, frozen=frozen, tok=tok, cfg=cfg, max_new=max_new, group=group,
                prompts=step_prompts(name, tok, n_problems, group, args.seed),
                n_params=sum(p.numel() for p in policy.parameters()))


def make_optimizer(w: dict):
    opt = torch.optim.AdamW(w["policy"].parameters(), lr=w["cfg"].lr, weight_decay=w["cfg"].weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def one_step(w: dict, engine: str, optimizer, scheduler, seed: int) -> dict:
    """One GRPO step as opensir.train runs it on CPU: generate with the policy, reward, optimise.
    Rewards are random draws (the scorer's cost is not the engines' business); advantages per group."""
    cfg, tok, policy = w["cfg"], w["tok"], w["policy"]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    comps = sample(policy, tok, w["prompts"], w["max_new"], engine, cfg.gen_batch, sampling=O.sampling(cfg), seed=seed)
    t1 = time.perf_counter()
    g = w["group"]
    rewards = torch.rand(len(comps) // g, g, dtype=torch.float64)
    adv = O.group_advantages(rewards, cfg.adv_eps).flatten().tolist()
    seqs = [O.TrainSeq(c.prompt_ids, c.ids, [1] * len(c.ids), a, "student") for c, a in zip(comps, adv)]
    O.optimise(policy, w["frozen"], optimizer, scheduler, [seqs], cfg, None)
    t2 = time.perf_counter()
    tokens = sum(len(c.ids) for c in comps)
    return dict(engine=engine, gen_s=t1 - t0, train_s=t2 - t1, step_s=t2 - t0, tokens=tokens,
                completions=len(comps), mean_len=tokens / len(comps))


def spread(xs: list) -> dict:
    return dict(mean=statistics.mean(xs), sd=statistics.stdev(xs) if len(xs) > 1 else 0.0, min=min(xs), max=max(xs))


def bench_steps(name: str, threads: int, args) -> list:
    """Warm-up steps, then `rounds` rounds in each of which every engine runs one step, in the same
    order every round (A, B, A, B, ...): a busy machine slows neighbours alike, so the per-round ratio is
    the figure to trust. Rows: one per engine (means, spreads), one per engine pair (paired ratios)."""
    torch.set_num_threads(threads)
    w = step_workload(name, args)
    optimizer, scheduler = make_optimizer(w)
    load0 = os.getloadavg()[0]
    print(f"\n{name}: {w['n_params'] / 1e6:.2f}M parameters, {threads} thread(s), {len(w['prompts'])} completions "
          f"(x G {w['group']}) <= {w['max_new']} tokens, load average {load0:.2f}")
    engines = list(args.engines)
    for e in engines:  # first-call costs (imports, lazy init) out of the timing, even with --warmup 0
        sample(w["policy"], w["tok"], w["prompts"][:2], 4, e, 2)
    order, runs = [], {e: [] for e in engines}
    for r in range(args.warmup + args.rounds):
        for e in engines:
            res = one_step(w, e, optimizer, scheduler, args.seed + r)
            if r >= args.warmup:
                order.append(e)
                runs[e].append(res)
    rows = []
    for e in engines:
        rs = runs[e]
        row = dict(mode="step", model=name, n_params=w["n_params"], threads=threads, engine=e,
                   max_new_tokens=w["max_new"], completions=rs[0]["completions"], rounds=len(rs),
                   mean_len=statistics.mean(x["mean_len"] for x in rs),
                   step_s=spread([x["step_s"] for x in rs]), gen_s=spread([x["gen_s"] for x in rs]),
                   train_s=spread([x["train_s"] for x in rs]),
                   completions_per_s=spread([x["completions"] / x["step_s"] for x in rs]),
                   gen_tokens_per_s=spread([x["tokens"] / x["gen_s"] for x in rs]), per_round=rs)
        rows.append(row)
        print(f"  {e:10s} step {row['step_s']['mean']:6.2f} s (sd {row['step_s']['sd']:.2f}, "
              f"{row['step_s']['min']:.2f}-{row['step_s']['max']:.2f})  generation {row['gen_s']['mean']:6.2f} s "
              f"({row['gen_tokens_per_s']['mean']:7.1f} tok/s)  training {row['train_s']['mean']:6.2f} s  "
              f"{row['completions_per_s']['mean']:6.2f} completions/s  mean length {row['mean_len']:.1f}")
    auto, why = auto_engine("cpu", w["n_params"], w["max_new"])
    faster = min(engines, key=lambda e: statistics.mean(x["step_s"] for x in runs[e]))
    print(f"  --engine auto would take {auto} ({why}); faster step here: {faster}")
    for b in engines[1:]:
        a = engines[0]
        for key in ("step_s", "gen_s"):  # time of a over time of b: > 1 means b is faster
            ratio = [x[key] / y[key] for x, y in zip(runs[a], runs[b])]
            rows.append(dict(mode="step", model=name, threads=threads, max_new_tokens=w["max_new"],
                             ratio=f"{a}/{b} {key}", **spread(ratio),
                             per_round=ratio))
            print(f"  {key}: {a} / {b} = {statistics.mean(ratio):.2f} (range {min(ratio):.2f}-{max(ratio):.2f}; "
                  f"> 1: {b} faster)")
    rows.append(dict(mode="step", model=name, threads=threads, order=order, load_avg=[load0, os.getloadavg()[0]],
                     auto=auto, auto_reason=why, faster=faster))
    return rows


# --- the same step in TRL's GRPOTrainer --------------------------------------------------------------

def trl_steps(name: str, threads: int, args) -> list:
    """The tiny/toy step workload through TRL's GRPOTrainer: the same prompts (conversational, so TRL
    applies the same chat template: identical token ids), G, budget, sampler (T 1, top-k 50), KL weight,
    learning rate, clip and micro-batch; 16 x G completions generated at once, one AdamW update a step.
    Step time is from the trainer's step callbacks, generation time from a timer around its sampler."""
    import random
    import tiny
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    if name not in ("tiny", "toy", "smoke"):
        raise SystemExit(f"bench.py --mode trl: tiny, toy or smoke, not {name}")
    torch.set_num_threads(threads)
    n_problems, group, max_new, _ = STEP_SHAPES["tiny" if name == "smoke" else name]
    if name == "smoke":
        n_problems, group, max_new = 2, 4, 8
    max_new = args.max_new_tokens or max_new
    path = models.resolve_model("tiny" if name == "smoke" else name, O.PROMPTS)
    tok = O.load_model(path, device="cpu")[1]
    texts = [p for p in step_prompts("tiny" if name == "smoke" else name, tok, n_problems, 1, args.seed)]
    rng = random.Random(f"bench-{'tiny' if name == 'smoke' else name}-{args.seed}")
    problems = ([tiny._tiny_problem(rng)[0] for _ in range(n_problems)] if name != "toy" else
                [tiny.toy_problem(rng, rng.randrange(len(tiny.TOY_RUNGS)))[0] for _ in range(n_problems)])
    assert [O.chat(tok, O.student_prompt(p)) for p in problems] == texts  # the same prompts as --mode step
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": O.student_prompt(p)}]} for p in problems])
    reward_rng = random.Random(args.seed)

    def random_reward(completions, **kw):
        return [reward_rng.random() for _ in completions]

    steps = args.warmup + args.rounds
    micro = min(STEP_CONFIG["train_micro_batch"], n_problems * group)
    cfg = GRPOConfig(
        output_dir=os.path.join(models.cache_root(), "bench-trl"), use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=micro, gradient_accumulation_steps=n_problems * group // micro,
        num_generations=group, max_completion_length=max_new, temperature=1.0, top_k=50, top_p=1.0,
        beta=STEP_CONFIG["beta"], learning_rate=STEP_CONFIG["lr"], lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=O.Config().max_grad_norm, num_iterations=1, max_steps=steps,
        logging_steps=1, report_to="none", save_strategy="no", seed=args.seed, dataloader_num_workers=0,
        disable_dropout=True, gradient_checkpointing=False)
    trainer = GRPOTrainer(model=path, reward_funcs=random_reward, args=cfg, train_dataset=data,
                          processing_class=tok)
    gen_times, step_times, t = [], [], {}
    sampler = trainer._generate_single_turn

    def timed_sampler(*a, **k):
        t0 = time.perf_counter()
        out = sampler(*a, **k)
        gen_times.append(time.perf_counter() - t0)
        return out

    trainer._generate_single_turn = timed_sampler

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            t["start"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - t["start"])

    trainer.add_callback(Timer())
    load0 = os.getloadavg()[0]
    trainer.train()
    lens = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    n = n_problems * group
    step_s, gen_s, lens = step_times[args.warmup:], gen_times[args.warmup:], lens[args.warmup:]
    row = dict(mode="trl", model=name, threads=threads, engine="trl", max_new_tokens=max_new, completions=n,
               rounds=len(step_s), mean_len=statistics.mean(lens) if lens else float("nan"),
               step_s=spread(step_s), gen_s=spread(gen_s), train_s=spread([a - b for a, b in zip(step_s, gen_s)]),
               completions_per_s=spread([n / s for s in step_s]),
               gen_tokens_per_s=spread([n * m / g for m, g in zip(lens, gen_s)]) if lens else None,
               load_avg=[load0, os.getloadavg()[0]], trl=__import__("trl").__version__,
               per_round=[dict(engine="trl", step_s=s, gen_s=g, train_s=s - g, completions=n, tokens=n * m,
                               mean_len=m) for s, g, m in zip(step_s, gen_s, lens)])
    print(f"\n{name} TRL {row['trl']}, {threads} thread(s): step {row['step_s']['mean']:.2f} s "
          f"({row['step_s']['min']:.2f}-{row['step_s']['max']:.2f}), generation {row['gen_s']['mean']:.2f} s, "
          f"{row['completions_per_s']['mean']:.2f} completions/s, mean length {row['mean_len']:.1f}")
    return [row]


def compare(models: list, threads: list, args) -> list:
    """Alternate whole processes, project (both engines, alternating inside) then TRL, `processes` times
    per model and thread count, and pair them: project / TRL completions per second of the step."""
    import subprocess
    import sys
    import tempfile
    rows = []
    common = ["--device", "cpu", "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    if args.max_new_tokens:
        common += ["--max_new_tokens", str(args.max_new_tokens)]
    for m in models:
        for t in threads:
            got = {"step": [], "trl": []}
            for p in range(args.processes):
                for mode, python in (("step", sys.executable), ("trl", args.python_trl)):
                    with tempfile.NamedTemporaryFile(suffix=".json") as f:
                        cmd = [python, os.path.abspath(__file__), "--mode", mode, "--models", m, "--threads", str(t),
                               "--engines", ",".join(args.engines), "--json", f.name, *common]
                        subprocess.run(cmd, check=True, stdout=sys.stdout if args.verbose else subprocess.DEVNULL)
                        got[mode].append(json.load(open(f.name)))
            for p, (proj, trl) in enumerate(zip(got["step"], got["trl"])):
                rows += [dict(r, process=p) for r in proj + trl]
            trl_cps = [x[0]["completions_per_s"]["mean"] for x in got["trl"]]
            for e in args.engines:
                cps = [next(r for r in x if r.get("engine") == e)["completions_per_s"]["mean"] for x in got["step"]]
                ratio = [a / b for a, b in zip(cps, trl_cps)]
                budget = next(r["max_new_tokens"] for r in got["step"][0] if "max_new_tokens" in r)
                rows.append(dict(mode="compare", model=m, threads=t, max_new_tokens=budget,
                                 ratio=f"{e}/trl completions_per_s",
                                 **spread(ratio), per_process=ratio))
                print(f"{m}, {t} thread(s): project --engine {e} / TRL completions per second of the step = "
                      f"{statistics.mean(ratio):.2f} (range {min(ratio):.2f}-{max(ratio):.2f}, {len(ratio)} processes each)")
    return rows


def markdown(rows: list) -> str:
    """The tables of docs/engines-cpu.md from step/trl/compare rows (of one run or several): per model,
    thread count and engine (TRL too), every timed step pooled over rounds and processes, median (range),
    a shared machine's spikes being what they are; then the paired ratios, pooled the same way."""
    def med(xs, nd=2):
        return f"{statistics.median(xs):.{nd}f} ({min(xs):.{nd}f}-{max(xs):.{nd}f})"
    steps, ratios = {}, {}
    for r in rows:
        if "step_s" in r:
            if "per_round" not in r:  # rows written before TRL's per-step timings were kept: its means
                m = {k: r[k]["mean"] for k in ("step_s", "gen_s", "train_s")}
                r = dict(r, rounds=1, per_round=[dict(m, completions=r["completions"],
                                                      tokens=r["gen_tokens_per_s"]["mean"] * m["gen_s"])])
            steps.setdefault((r["model"], r["threads"], r["engine"], r["max_new_tokens"]), []).append(r)
        elif "ratio" in r:
            ratios.setdefault((r["model"], r["threads"], r.get("max_new_tokens", "-"), r["ratio"]), []).extend(
                r.get("per_round") or r["per_process"])
    out = ["| model | threads | engine | max new | mean length | step s | generation s | training s | "
           "generation tokens/s | completions/s of the step | timed steps |", "|" + "---|" * 11]
    for (m, t, e, n), rs in steps.items():
        xs = [x for r in rs for x in r["per_round"]]
        out.append(f"| {m} | {t} | {e} | {n} | {statistics.mean(r['mean_len'] for r in rs):.1f} | "
                   f"{med([x['step_s'] for x in xs])} | {med([x['gen_s'] for x in xs])} | "
                   f"{med([x['train_s'] for x in xs])} | {med([x['tokens'] / x['gen_s'] for x in xs], 0)} | "
                   f"{med([x['completions'] / x['step_s'] for x in xs])} | {len(xs)} ({len(rs)} processes) |")
    out += ["", "| model | threads | max new | ratio | median | range | mean | paired |", "|" + "---|" * 8]
    for (m, t, n, k), xs in ratios.items():
        out.append(f"| {m} | {t} | {n} | {k} | {statistics.median(xs):.2f} | {min(xs):.2f}-{max(xs):.2f} | "
                   f"{statistics.mean(xs):.2f} | {len(xs)} {'processes' if k.endswith('completions_per_s') else 'rounds'} |")
    return "\n".join(out)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="gen", choices=["gen", "step", "trl", "compare", "calls"],
                   help="gen: generation alone; step: the whole GRPO step (CPU); trl: the step in TRL's "
                        "GRPOTrainer; compare: alternate processes of step and trl; calls: a step's rounds in "
                        "two calls against one call per round, and the continuous engine's kept manager "
                        "against a new one per call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds; for tests)")
    p.add_argument("--models", help="comma-separated (default: both paper shapes on cuda, cpu-29m on cpu; "
                                    "step: tiny,toy,cpu-29m)")
    p.add_argument("--engines", default="generate,continuous")
    p.add_argument("--rounds", type=int, help="repeats per phase (tokens/s mean +- standard error)")
    p.add_argument("--warmup", type=int, default=1, help="step/trl: untimed steps first (per engine)")
    p.add_argument("--max_new_tokens", type=int, default=0, help="step/trl: budget (0: the model's STEP_SHAPES)")
    p.add_argument("--processes", type=int, default=3, help="compare: processes of each system")
    p.add_argument("--python_trl", default="python", help="compare: the interpreter that has trl")
    p.add_argument("--teacher_prompts", type=int, help="teacher samples per phase (paper round: 32)")
    p.add_argument("--student_problems", type=int, help="problems x 8 solutions per phase")
    p.add_argument("--teacher_max_new", type=int)
    p.add_argument("--student_max_new", type=int)
    p.add_argument("--mean_len", type=int, help="mean completion length the EOS set aims at")
    p.add_argument("--gen_batch", type=int, default=64, help="--gen_batch of the generate engine")
    p.add_argument("--kv_cache_gib", type=float, default=0.0, help="cap on the continuous engine's KV cache")
    p.add_argument("--bandwidth_tbs", type=float, default=0.0, help="memory bandwidth (TB/s) for the roofline")
    p.add_argument("--paper_teacher_len", type=int, default=700, help="assumed mean teacher tokens (extrapolation)")
    p.add_argument("--paper_student_len", type=int, default=700, help="assumed mean student tokens (extrapolation)")
    p.add_argument("--threads", default="0", help="CPU threads for torch, comma-separated for step/trl/compare "
                                                   "(0: torch's default)")
    p.add_argument("--verbose", action="store_true", help="compare: show the processes' output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--tables", nargs="+", metavar="JSON", help="print the markdown tables of saved step/trl/"
                                                                 "compare rows and exit")
    args = p.parse_args(argv)
    if args.tables:
        rows = []
        for path in args.tables:
            got = json.load(open(path))
            budget = {(r["model"], r["threads"]): r["max_new_tokens"] for r in got if "max_new_tokens" in r}
            rows += [r if "max_new_tokens" in r or (r.get("model"), r.get("threads")) not in budget
                     else dict(r, max_new_tokens=budget[r["model"], r["threads"]]) for r in got]
        print(markdown(rows))
        return rows
    threads = [int(t) for t in str(args.threads).split(",")]
    args.engines = args.engines.split(",")
    print(f"bench.py {' '.join(argv) if argv else ''}: torch {torch.__version__}, mode {args.mode}, "
          f"threads {threads}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    if args.mode == "calls":
        rows = call_bench(args, threads[0])
    elif args.mode in ("step", "trl", "compare"):
        if args.device != "cpu":
            raise SystemExit("bench.py: --mode step/trl/compare measure CPU steps (pass --device cpu)")
        args.rounds = args.rounds or (1 if args.smoke else 5)
        models = args.models.split(",") if args.models else ["smoke"] if args.smoke else ["tiny", "toy", "cpu-29m"]
        threads = [t or torch.get_num_threads() for t in threads]
        if args.mode == "compare":
            rows = compare(models, threads, args)
        else:
            run = bench_steps if args.mode == "step" else trl_steps
            rows = [r for m in models for t in threads for r in run(m, t, args)]
        print("\n" + markdown(rows))
    else:
        rows = generation_bench(args, threads[0])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def call_bench(args, threads: int) -> list:
    """Whole play_rounds of one step, variants alternating in every round: `generate` with the step's rounds
    in two calls (play_rounds over all rounds) and with one call per round; the continuous engine with its
    manager kept across those per-round calls and with a new manager per call. Rows: seconds per variant
    (the first round warms up and is dropped) and the paired ratios."""
    from collections import Counter
    torch.set_num_threads(threads)
    name = "tiny" if args.smoke or not args.models else args.models.split(",")[0]
    model, tok = O.load_model(name, device="cpu", dtype="fp32")
    eos = O.eos_token_ids(model, tok)
    cfg = O.Config(model=name, rounds_per_step=2 if args.smoke else 8, n_refs=4, teacher_max_new_tokens=64,
                   student_max_new_tokens=48)
    texts = ["What is 1+1?", "What is 2+3?", "What is 4*5?", "What is 7-2?"]
    pool = O.Pool()
    pool.add(texts, [[] for _ in texts], O.embed_texts(model, tok, texts))
    refs = {r: [(r + i) % len(texts) for i in range(cfg.n_refs)] for r in range(cfg.rounds_per_step)}

    class NewManagerPerCall(engines.ContinuousEngine):
        def generate(self, *a, **k):
            out = super().generate(*a, **k)
            self.sleep()
            return out

    def timed(engine, step, together):
        t0 = time.perf_counter()
        for part in ([refs] if together else [{r: refs[r]} for r in refs]):
            O.play_rounds(engine, model, tok, pool, part, step, cfg, Counter())
        engine.sleep()
        return time.perf_counter() - t0
    variants = {"generate, two calls": (lambda: engines.HFEngine(model, eos, tok.pad_token_id, 256), True),
                "generate, a call per round": (lambda: engines.HFEngine(model, eos, tok.pad_token_id, 256), False),
                "continuous, kept manager": (lambda: engines.ContinuousEngine(model, eos, tok.pad_token_id), False),
                "continuous, a manager per call": (lambda: NewManagerPerCall(model, eos, tok.pad_token_id), False)}
    secs = {v: [] for v in variants}
    for step in range(1 + (args.rounds or (1 if args.smoke else 5))):
        for v, (make, together) in variants.items():
            secs[v].append(timed(make(), step + 1, together))
    rows = [dict(mode="calls", model=name, threads=threads, variant=v, rounds=cfg.rounds_per_step,
                 seconds=spread(s[1:])) for v, s in secs.items()]
    for a, b in (("generate, a call per round", "generate, two calls"),
                 ("continuous, a manager per call", "continuous, kept manager")):
        r = [x / y for x, y in zip(secs[a][1:], secs[b][1:])]
        rows.append(dict(mode="calls", model=name, threads=threads, ratio=f"{a} / {b}", per_step=r, **spread(r)))
    for row in rows:
        print({k: v for k, v in row.items() if k != "per_step"})
    return rows


def generation_bench(args, threads: int) -> list:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: --device cuda, but torch sees no GPU (use --device cpu)")
    sizes = {  # rounds, teacher prompts, student problems, teacher/student budgets, mean length
        "smoke": (1, 4, 2, 16, 24, 8), "cpu": (3, 8, 4, 128, 256, 80), "cuda": (2, 32, 8, 256, 768, 200)}
    d = dict(zip(("rounds", "teacher_prompts", "student_problems", "teacher_max_new", "student_max_new",
                  "mean_len"), sizes["smoke" if args.smoke else args.device]))
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    names = args.models.split(",") if args.models else (
        ["smoke"] if args.smoke else ["cpu-29m"] if args.device == "cpu" else list(models.ARCHITECTURES)[:2])
    if threads:
        torch.set_num_threads(threads)
    return [r for m in names for r in bench_model(m, args)]


if __name__ == "__main__":
    main()
