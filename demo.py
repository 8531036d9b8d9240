"""Show that it learns, in the toy world (`--model toy`, built by tiny.py) on a CPU.

    python demo.py trainer  --seeds 1 2   # (a) GRPO rewarded with the TRUE answers: a diagnostic of the
                                          #     trainer that uses labels. It is NOT OpenSIR.
    python demo.py majority --seeds 1 2   # (b) the student alone, rewarded for agreeing with its own
                                          #     majority answer on a fixed problem set: no labels (a
                                          #     group whose majority holds < --min_agreement is skipped)
    python demo.py opensir  --seeds 1 2   # (c) the full loop (opensir.train) from "What is 1+1?", and
                                          #     the frozen-teacher ablation beside it

    python demo.py gate --split dev       # before any training: does the vote know more than the model's
                                          #     greedy answer, and what does lowering the temperature give?

Each reuses opensir.py's functions (generate, majority_vote, student_rewards, group_advantages,
optimise: sequence_logprobs and the GRPO loss). Every few steps it measures held-out accuracy: 16
samples per problem, mean accuracy (mean@16) and accuracy of the majority answer (maj@16), at the
training temperature (1.0, top-k 50) and at eval.py's (0.6, top-p 0.95). Differences from step 0 come
with paired standard errors over problems; a gain counts only beyond 2 SE in every seed.

Held-out problems come from tiny.toy_problem_set("heldout"): their texts hash to a split that the
toy model's pre-training and every training draw here exclude (the facts they use, such as 7 * 8 = 56,
do appear inside other training problems). Tune only with --split dev. In (c) the teacher invents
problems itself and may write a held-out text; the report counts how often it did.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from collections import Counter
from typing import Optional

import numpy as np
import torch

import engines
import opensir as O
import runs
import tiny as T

SETTINGS = {  # name: (temperature, top_k, top_p)
    "T1.0": (1.0, 50, 1.0),  # the training sampling
    "T0.6": (0.6, 0, 0.95),  # eval.py's
}
METRICS = [(s, m) for s in SETTINGS for m in ("mean", "maj")] + [("greedy", "mean")]  # greedy: the mode's answer
SWEEP = (0.2, 0.4, 0.6, 0.8, 1.0)  # gate: temperatures (top-p 0.95) of the sharpening baseline's sweep


# --- evaluation ------------------------------------------------------------------------------------

def sample(model, tok, prompts: list, max_new_tokens: int, sampling: engines.Sampling, seed: int, step: int = 0,
           batch: int = 256) -> list:
    """Completions from opensir.generate on the HF engine, one seeded stream per prompt."""
    engine = engines.HFEngine(model, O.eos_token_ids(model, tok), tok.pad_token_id, batch)
    return O.generate(engine, tok, prompts, max_new_tokens, sampling,
                      [O.sample_seed(seed, step, 0, 1, i) for i in range(len(prompts))])


def evaluate(model, tok, problems: list, n: int, max_new_tokens: int, seed: int, batch: int = 256) -> dict:
    """{setting: {"mean": per-problem share of correct samples, "maj": per-problem 0/1 majority correct}},
    and {"greedy": {"mean": per-problem 0/1 greedy answer correct}}. problems: [(text, answer, rung)].
    Answers compared by opensir's vote key (normalize_answer)."""
    out = {}
    for name, (temp, top_k, top_p) in SETTINGS.items():
        per = sampled_answers(model, tok, problems, n, max_new_tokens, engines.Sampling(temp, top_k, top_p), seed, batch)
        out[name] = {"mean": share_right(per), "maj": majority_right(per)}
    greedy = sampled_answers(model, tok, problems, 1, max_new_tokens, engines.Sampling(greedy=True), seed, batch)
    out["greedy"] = {"mean": share_right(greedy)}
    return out


def sampled_answers(model, tok, problems: list, n: int, max_new_tokens: int, sampling, seed: int,
                    batch: int = 256) -> list:
    """Per problem: (its n sampled answers, the gold answer), both under opensir's vote key."""
    prompts = [O.chat(tok, O.student_prompt(t)) for t, _, _ in problems for _ in range(n)]
    ans = [O.normalize_answer(O.final_answer(c.text))
           for c in sample(model, tok, prompts, max_new_tokens, sampling, seed, batch=batch)]
    return [(ans[i * n: (i + 1) * n], O.normalize_answer(str(gold))) for i, (_, gold, _) in enumerate(problems)]


def share_right(per: list) -> list:
    """Per problem, the share of its sampled answers that are right (sampled_answers' pairs)."""
    return [sum(a == key for a in ans) / len(ans) for ans, key in per]


def majority_right(per: list) -> list:
    """Per problem, 1.0 when the majority of its sampled answers is right, else 0.0."""
    return [float(O.majority_vote(ans)[0] == key) for ans, key in per]


def paired(before: list, after: list) -> tuple:
    """(mean of after - before, its standard error over problems), both x 100."""
    d = np.asarray(after, float) - np.asarray(before, float)
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return 100 * float(d.mean()), 100 * float(se)


def beyond_2se(diffs: list) -> int:
    """+1 when every seed's (diff, SE) is above +2 SE, -1 when every one is below -2 SE, else 0."""
    return 1 if all(d > 2 * se for d, se in diffs) else -1 if all(d < -2 * se for d, se in diffs) else 0


def summarise(evals_by_seed: dict) -> list:
    """Rows: (setting, metric, step, per-seed accuracy, per-seed (diff, SE) vs step 0, verdict)."""
    rows = []
    seeds = sorted(evals_by_seed)
    steps = sorted(set.intersection(*[set(evals_by_seed[s]) for s in seeds]), key=int)
    for setting, metric in METRICS:
        for st in steps:
            acc = [100 * float(np.mean(evals_by_seed[s][st][setting][metric])) for s in seeds]
            diffs = [paired(evals_by_seed[s][steps[0]][setting][metric], evals_by_seed[s][st][setting][metric])
                     for s in seeds]
            rows.append({"setting": setting, "metric": metric, "step": int(st), "acc": acc, "diff": diffs,
                         "verdict": {1: "gain", -1: "loss", 0: "no change beyond 2 SE in every seed"}[beyond_2se(diffs)]})
    return rows


def difference(per_a: dict, per_b: dict) -> list:
    """a minus b at their last common step, per seed, paired over problems (the same held-out problems and
    evaluation seed): rows of (setting, metric, step, [(diff, SE) per seed], verdict). per_a, per_b:
    results.json's "per_problem" of two variants ({seed: {step: evaluate(...)}})."""
    seeds = sorted(set(per_a) & set(per_b), key=int)
    step = max(set.intersection(*[set(per_a[s]) & set(per_b[s]) for s in seeds]), key=int)
    rows = []
    for setting, metric in METRICS:
        diffs = [paired(per_b[s][step][setting][metric], per_a[s][step][setting][metric]) for s in seeds]
        rows.append({"setting": setting, "metric": metric, "step": int(step), "diff": diffs, "verdict": {
            1: "a higher", -1: "b higher", 0: "no difference beyond 2 SE in every seed"}[beyond_2se(diffs)]})
    return rows


def table(rows: list, seeds: list, label: str = "") -> str:
    """A markdown table of summarise() rows."""
    head = (f"| {label or 'run'} | setting | metric@16 | step | " + " | ".join(f"acc seed {s}" for s in seeds)
            + " | " + " | ".join(f"Δ vs step 0, seed {s} (± SE)" for s in seeds) + " | verdict |")
    lines = [head, "|" + "---|" * (5 + 2 * len(seeds))]
    for r in rows:
        lines.append(f"| {label} | {r['setting']} | {'acc@1' if r['setting'] == 'greedy' else r['metric']} | {r['step']} | "
                     + " | ".join(f"{a:.1f}" for a in r["acc"]) + " | "
                     + " | ".join(f"{d:+.1f} ± {se:.1f}" for d, se in r["diff"]) + f" | {r['verdict']} |")
    return "\n".join(lines)


# --- the gate: does the vote know more than the model's first guess? --------------------------------

def gate(args, problems: list, log) -> dict:
    """The untrained toy model on --split (choose settings on dev): greedy accuracy; mean@N and maj@N at the
    training sampling (--sampling); over disjoint groups of --group samples at that sampling, how often the
    majority label is right where greedy is wrong, and the reverse; and mean@N at each SWEEP temperature
    (top-p 0.95), whose best is the sharpening baseline that a label-free gain must beat. A world is fit for
    the label-free demonstrations when maj@N beats greedy by >= 5 points and the first count is >= 5 times
    the second: only then can the vote teach the model something its mode does not already know."""
    model, tok = O.load_model("toy", device="cpu", dtype="fp32")
    n, g, budget = args.eval_samples, args.group, args.max_new_tokens
    greedy = [x == 1.0 for x in share_right(sampled_answers(model, tok, problems, 1, budget,
                                                            engines.Sampling(greedy=True), args.eval_seed))]
    per = sampled_answers(model, tok, problems, n, budget, engines.Sampling(*SETTINGS[args.sampling]), args.eval_seed)
    labels = [[O.majority_vote(ans[i:i + g])[0] == key for i in range(0, n - g + 1, g)] for ans, key in per]
    res = {"problems": len(problems), "split": args.split, "sampling": args.sampling, "n": n, "group": g,
           "greedy": 100 * float(np.mean(greedy)),
           "mean": 100 * float(np.mean(share_right(per))), "maj": 100 * float(np.mean(majority_right(per))),
           "label_right_greedy_wrong": sum(lab and not gr for ls, gr in zip(labels, greedy) for lab in ls),
           "label_wrong_greedy_right": sum(gr and not lab for ls, gr in zip(labels, greedy) for lab in ls),
           "sweep_mean": {}}
    for t in SWEEP:
        per_t = sampled_answers(model, tok, problems, n, budget, engines.Sampling(t, 0, 0.95), args.eval_seed)
        res["sweep_mean"][str(t)] = 100 * float(np.mean(share_right(per_t)))
    res["sharpening_baseline"] = max(res["sweep_mean"].items(), key=lambda kv: kv[1])
    res["passes"] = bool(res["maj"] - res["greedy"] >= 5 and
                         res["label_right_greedy_wrong"] >= 5 * res["label_wrong_greedy_right"])
    log(f"gate on {len(problems)} {args.split} problems: greedy {res['greedy']:.1f}, at {args.sampling} mean@{n} "
        f"{res['mean']:.1f} maj@{n} {res['maj']:.1f} (maj - greedy {res['maj'] - res['greedy']:+.1f}, need >= +5); groups "
        f"of {g}: label right where greedy wrong {res['label_right_greedy_wrong']}, the reverse "
        f"{res['label_wrong_greedy_right']} (need >= 5:1); mean@{n} by temperature (top-p 0.95) "
        + ", ".join(f"T {t} {v:.1f}" for t, v in res["sweep_mean"].items())
        + f" -> {'PASSES' if res['passes'] else 'FAILS'}")
    return res


# --- (a) and (b): the student alone, with opensir's pieces -----------------------------------------

def student_only(mode: str, seed: int, args, problems: list, log) -> dict:
    """GRPO on student groups only. mode "trainer": reward = agreeing with the TRUE answer (labels; a
    diagnostic, not OpenSIR); mode "majority": reward = agreeing with the group's majority (no labels).
    Returns {step: evaluate(...)}; also writes train.jsonl."""
    temperature, top_k, top_p = SETTINGS[args.sampling]  # log-probs are taken at this temperature too
    cfg = O.Config(**{**O.TOY_DEFAULTS, "model": "toy", "seed": seed, "lr": args.lr, "beta": args.beta,
                      "student_group": args.group, "warmup_steps": 0, "temperature": temperature,
                      "top_k": top_k, "top_p": top_p, "student_max_new_tokens": args.max_new_tokens})
    torch.set_num_threads(args.threads)
    policy, tok = O.load_model("toy", device="cpu", dtype="fp32")
    frozen, _ = O.load_model("toy", device="cpu", dtype="fp32")
    frozen.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    O.set_seed(seed)
    rng = random.Random(f"demo-{mode}-{seed}")
    fixed = T.toy_problem_set("train", args.fixed_per_rung, seed=0, rungs=args.rungs)  # (b): one set, every seed
    out_dir = os.path.join(args.out, f"seed{seed}")
    os.makedirs(out_dir, exist_ok=True)
    evals = {0: evaluate(policy, tok, problems, args.eval_samples, args.max_new_tokens, args.eval_seed)}
    log(f"[{mode} seed {seed}] step 0: " + _brief(evals[0]))
    with open(os.path.join(out_dir, "train.jsonl"), "w") as f:
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            if mode == "trainer":
                drawn = [T.toy_draw(rng, rungs=args.rungs) for _ in range(args.problems_per_step)]
                batch = [(text, answer) for text, _, answer, _ in drawn]  # toy_draw: (text, steps, answer, rung)
            else:
                batch = [(t, a) for t, a, _ in rng.sample(fixed, min(args.problems_per_step, len(fixed)))]
            prompts = [O.chat(tok, O.student_prompt(t)) for t, _ in batch for _ in range(cfg.student_group)]
            comps = sample(policy, tok, prompts, cfg.student_max_new_tokens, O.sampling(cfg), seed, step)
            rounds, true_acc, label_ok, skipped, shares = [], [], [], 0, []
            for i, (_, gold) in enumerate(batch):
                group = comps[i * cfg.student_group: (i + 1) * cfg.student_group]
                answers = [O.normalize_answer(O.final_answer(c.text)) for c in group]
                gold_key = O.normalize_answer(str(gold))
                majority, share, _ = O.majority_vote(answers, cfg.solve_rate_over)
                label = gold_key if mode == "trainer" else majority
                shares.append(share)
                true_acc += [float(a == gold_key) for a in answers]  # logged only: (b) never reads it
                label_ok.append(float(majority == gold_key))
                if mode == "majority" and share < args.min_agreement:  # too split to trust its vote: skip
                    skipped += 1
                    continue
                rewards = O.student_rewards(answers, label, [O.has_final_line(c.text) for c in group], cfg)
                adv = O.group_advantages(torch.tensor([rewards], dtype=torch.float64), cfg.adv_eps)[0]
                rounds.append([O.TrainSeq(c.prompt_ids, c.ids, [1] * len(c.ids), float(a), "student")
                               for c, a in zip(group, adv)])
            stats = O.optimise(policy, frozen, optimizer, scheduler, rounds, cfg, None)
            rec = {"step": step, "train_true_acc": float(np.mean(true_acc)),
                   "majority_label_acc": float(np.mean(label_ok)), "skipped_groups": skipped,
                   "agreement": shares, "rungs": [T.toy_rung(t) for t, _ in batch],
                   "temperature": cfg.temperature, **stats, "sec": time.perf_counter() - t0}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            if step % args.eval_every == 0 or step == args.steps:
                evals[step] = evaluate(policy, tok, problems, args.eval_samples, args.max_new_tokens, args.eval_seed)
                log(f"[{mode} seed {seed}] step {step}: " + _brief(evals[step])
                    + f" | train acc {rec['train_true_acc']:.2f} label acc {rec['majority_label_acc']:.2f}")
    return evals


def _brief(ev: dict) -> str:
    return " ".join(f"{s} {m} {100 * np.mean(ev[s][m]):.1f}" for s, m in METRICS)


# --- (c): the full loop, and the frozen-teacher ablation ---------------------------------------------

def rung_shift(run_dir: str, stages: int) -> list:
    """Per stage of a run: share of legal problems on each toy rung (or off-template), their mean rung,
    the student solve rate, and how many generated texts fall in the held-out split."""
    import analyze as A
    rows = [r for _, r in A.read_jsonl_stream(os.path.join(run_dir, "problems.jsonl"), lambda n, why: None)]
    steps = sorted({r["step"] for r in rows})
    out = []
    for a, b in A.stage_bounds(steps, stages):
        legal = [r for r in rows if a <= r["step"] <= b and r["legal"]]
        rungs = [T.toy_rung(r["problem"]) for r in legal]
        c = Counter("off-template" if x is None else str(x) for x in rungs)
        on = [x for x in rungs if x is not None]
        out.append({"steps": [a, b], "legal": len(legal),
                    "rung_share": {k: c[k] / max(len(legal), 1) for k in
                                   [str(i) for i in range(len(T.TOY_RUNGS))] + ["off-template"]},
                    "mean_rung": float(np.mean(on)) if on else None,
                    # SE as if problems were independent draws (they share references: optimistic)
                    "mean_rung_se": float(np.std(on, ddof=1) / np.sqrt(len(on))) if len(on) > 1 else None,
                    "solve_rate": float(np.mean([r["solve_rate"] for r in legal if r["n_parsed"]]) if legal else 0.0),
                    "heldout_texts": sum(T.toy_split(r["problem"]) == "heldout" for r in legal if r["problem"])})
    return out


def rung_table(stages: list) -> str:
    """A markdown table of rung_shift() stages."""
    keys = list(stages[0]["rung_share"]) if stages else []
    lines = ["| steps | legal | mean rung (± SE) | solve rate | " + " | ".join(f"rung {k}" for k in keys)
             + " | held-out texts |", "|" + "---|" * (5 + len(keys))]
    for st in stages:
        rung = "–" if st["mean_rung"] is None else f"{st['mean_rung']:.2f} ± {st.get('mean_rung_se') or 0:.2f}"
        lines.append(f"| {st['steps'][0]}-{st['steps'][1]} | {st['legal']} | {rung} | {st['solve_rate']:.2f} | "
                     + " | ".join(f"{v:.0%}" for v in st["rung_share"].values()) + f" | {st['heldout_texts']} |")
    return "\n".join(lines)


def opensir_run(seed: int, variant: str, args, problems: list, log) -> dict:
    """opensir.train on the toy model (TOY_DEFAULTS), then held-out accuracy of its checkpoints."""
    out_dir = os.path.join(args.out, f"{variant}-seed{seed}")
    flags = ["--model", "toy", "--seed", str(seed), "--steps", str(args.steps), "--out", out_dir,
             "--save_every", str(args.eval_every), "--threads", str(args.threads), "--lr", str(args.lr),
             "--beta", str(args.beta), "--student_max_new_tokens", str(args.max_new_tokens)]
    if args.rounds_per_step:
        flags += ["--rounds_per_step", str(args.rounds_per_step)]
    if variant == "frozen_teacher":
        flags.append("--no-train_teacher")
    flags += shlex.split(args.opensir_args)  # last: they win over the flags above
    if os.path.exists(os.path.join(out_dir, "config.json")):
        flags.append("--resume")  # finish an interrupted run; a finished one is only evaluated
    cfg = O.config_from_args(flags)
    if not os.path.exists(runs.checkpoint_dir(out_dir, args.steps)):
        O.train(cfg)
    model, tok = O.load_model("toy", device="cpu", dtype="fp32")
    evals = {0: evaluate(model, tok, problems, args.eval_samples, args.max_new_tokens, args.eval_seed)}
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        ckpt = runs.checkpoint_dir(out_dir, step)
        if os.path.exists(ckpt):
            model, tok = O.load_model(ckpt, device="cpu", dtype="fp32")
            evals[step] = evaluate(model, tok, problems, args.eval_samples, args.max_new_tokens, args.eval_seed)
            log(f"[opensir {variant} seed {seed}] step {step}: " + _brief(evals[step]))
    return evals


# --- main -------------------------------------------------------------------------------------------

def plot(summary: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
    for ax, (setting, metric) in zip(axes, METRICS):
        for variant, res in summary.items():
            rows = [r for r in res["rows"] if r["setting"] == setting and r["metric"] == metric]
            for k, seed in enumerate(res["seeds"]):  # error bars: the paired SE of the change from step 0
                ax.errorbar([r["step"] for r in rows], [r["acc"][k] for r in rows], yerr=[r["diff"][k][1] for r in rows],
                            marker="o", ms=3, capsize=2, label=f"{variant} seed {seed}")
        if rows:
            ax.axhline(rows[0]["acc"][0], color="grey", ls="--", lw=0.8, label="step 0")
        ax.set_title(f"held-out greedy accuracy" if setting == "greedy" else f"held-out {metric}@16 at {setting}",
                     fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["gate", "trainer", "majority", "opensir"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="training seeds")
    p.add_argument("--out", default="", help="default: demo_runs/<mode>")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval_every", type=int, default=20)
    p.add_argument("--lr", type=float, default=O.TOY_DEFAULTS["lr"])
    p.add_argument("--beta", type=float, default=0.04, help="KL weight against the initial toy model")
    p.add_argument("--group", type=int, default=8, help="(a, b) samples per problem, G")
    p.add_argument("--problems_per_step", type=int, default=16, help="(a, b) student groups per step")
    p.add_argument("--rungs", type=int, nargs="+", default=None, help="(a, b) train on these toy rungs only "
                   "(default: all five); evaluation still covers every rung")
    p.add_argument("--sampling", choices=list(SETTINGS), default="T1.0", help="(a, b) the sampling that "
                   "training samples, votes and takes log-probs with (T1.0: opensir's; T0.6: eval.py's)")
    p.add_argument("--min_agreement", type=float, default=0.5, help="(b) train on a group only if its majority "
                   "answer holds at least this share of its parsed answers (label-free; 0: every group)")
    p.add_argument("--fixed_per_rung", type=int, default=24, help="(b) the fixed training set: problems per rung")
    p.add_argument("--rounds_per_step", type=int, default=0, help="(c) 0: TOY_DEFAULTS")
    p.add_argument("--max_new_tokens", type=int, default=64, help="student budget, training and evaluation")
    p.add_argument("--split", choices=["heldout", "dev"], default="heldout", help="evaluation set; tune on dev")
    p.add_argument("--eval_per_rung", type=int, default=40, help="evaluation problems per rung (fewer where a "
                   "rung has fewer in the split)")
    p.add_argument("--eval_samples", type=int, default=16)
    p.add_argument("--eval_seed", type=int, default=0, help="sampling seed of the evaluation")
    p.add_argument("--opensir_args", default="", help="(c) more opensir.py flags, e.g. \"--band_lo 0.3 --band_hi 0.7\"")
    p.add_argument("--stages", type=int, default=3, help="(c) stages for the rung shift")
    p.add_argument("--variants", nargs="+", choices=["full", "frozen_teacher"], default=["full", "frozen_teacher"],
                   help="(c) which runs: the full loop and/or the frozen-teacher ablation")
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: Optional[list] = None) -> dict:
    args = build_parser().parse_args(argv)
    args.out = args.out or os.path.join("demo_runs", args.mode)
    if args.steps < 1 or args.eval_every < 1 or args.eval_samples < 1 or args.group < 2:
        raise SystemExit("need --steps, --eval_every, --eval_samples >= 1 and --group >= 2")
    if not 0.0 <= args.min_agreement <= 1.0 or any(r not in range(len(T.TOY_RUNGS)) for r in args.rungs or []):
        raise SystemExit(f"need 0 <= --min_agreement <= 1 and --rungs among 0..{len(T.TOY_RUNGS) - 1}")
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    torch.set_num_threads(args.threads)
    problems = T.toy_problem_set(args.split, args.eval_per_rung, seed=0)
    log(f"demo {args.mode}: {' '.join(sys.argv[1:]) if argv is None else ' '.join(argv)}")
    log(f"evaluation set: {len(problems)} {args.split} problems, by rung "
        f"{dict(sorted(Counter(r for _, _, r in problems).items()))}")
    if args.mode == "gate":
        res = gate(args, problems, log)
        with open(os.path.join(args.out, "gate.json"), "w") as f:
            json.dump(res, f, indent=1)
        return res
    variants = args.variants if args.mode == "opensir" else [args.mode]
    summary = {}
    for variant in variants:
        evals = {}
        for seed in args.seeds:
            if args.mode == "opensir":
                evals[seed] = opensir_run(seed, variant, args, problems, log)
            else:
                evals[seed] = student_only(args.mode, seed, args, problems, log)
        res = {"seeds": args.seeds, "rows": summarise(evals),
               "per_problem": {str(s): {str(st): e for st, e in ev.items()} for s, ev in evals.items()}}
        if args.mode == "opensir":
            res["rung_shift"] = {str(s): rung_shift(os.path.join(args.out, f"{variant}-seed{s}"), args.stages)
                                 for s in args.seeds}
        summary[variant] = res
        log(table(res["rows"], args.seeds, variant))
    if len(summary) == 2:  # the paired effect of training the teacher
        rows = difference(summary["full"]["per_problem"], summary["frozen_teacher"]["per_problem"])
        log("full minus frozen teacher, paired: " + "; ".join(
            f"{r['setting']} {r['metric']} " + ", ".join(f"{d:+.1f} ± {se:.1f}" for d, se in r["diff"]) for r in rows))
    result = {"mode": args.mode, "args": vars(args), "problems": problems, "variants": summary}
    if len(summary) == 2:
        result["full_minus_frozen"] = rows
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        for variant, res in summary.items():
            f.write(table(res["rows"], args.seeds, variant) + "\n\n")
            for s, stages in res.get("rung_shift", {}).items():
                f.write(f"rung shift, {variant} seed {s}:\n\n" + rung_table(stages) + "\n\n")
    if plot(summary, os.path.join(args.out, "accuracy.png")):
        log(f"wrote {args.out}/accuracy.png")
    log(f"wrote {args.out}/results.json and results.md")
    return result


if __name__ == "__main__":
    main()
