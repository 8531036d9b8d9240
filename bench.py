"""Generation speed of the two engines (`--engine generate` / `continuous`), side by side in one run.

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
import resource
import statistics
import time

import torch

import engines
import models
import opensir as O

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


def run_phase(model, tok, prompts, max_new, engine, args) -> tuple:
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    comps = O.generate(model, tok, prompts, max_new, 1.0, 50, 1.0, batch_size=args.gen_batch, engine=engine,
                       kv_cache_gib=args.kv_cache_gib)
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
        O.generate(model, tok, phases["teacher"][0][:2], 4, 1.0, 50, 1.0, 2, engine=engine)  # warm-up
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


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds; for tests)")
    p.add_argument("--models", help="comma-separated (default: both paper shapes on cuda, cpu-29m on cpu)")
    p.add_argument("--engines", default="generate,continuous")
    p.add_argument("--rounds", type=int, help="repeats per phase (tokens/s mean +- standard error)")
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
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: --device cuda, but torch sees no GPU (use --device cpu)")
    sizes = {  # rounds, teacher prompts, student problems, teacher/student budgets, mean length
        "smoke": (1, 4, 2, 16, 24, 8), "cpu": (3, 8, 4, 128, 256, 80), "cuda": (2, 32, 8, 256, 768, 200)}
    d = dict(zip(("rounds", "teacher_prompts", "student_problems", "teacher_max_new", "student_max_new",
                  "mean_len"), sizes["smoke" if args.smoke else args.device]))
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.engines = args.engines.split(",")
    names = args.models.split(",") if args.models else (
        ["smoke"] if args.smoke else ["cpu-29m"] if args.device == "cpu" else list(models.ARCHITECTURES)[:2])
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench.py {' '.join(argv) if argv else ''}: torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, rounds {args.rounds}")
    rows = [r for m in names for r in bench_model(m, args)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
