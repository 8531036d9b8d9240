"""The curriculum report: the paper's analyses of a run, drawn from its logs.

    python analyze.py RUN_DIR [RUN_DIR ...] --out REPORT_DIR [--frozen-model tiny]

Reads each run's problems.jsonl (streamed line by line: a paper-scale run writes gigabytes),
metrics.jsonl and config.json, and writes REPORT_DIR/report.html (one self-contained page, plots
embedded), REPORT_DIR/report.json (every number shown) and REPORT_DIR/fig_*.png. Plots need
matplotlib (optional: `pip install -r requirements-plots.txt`); without it the tables are still written.

Sections, per run and side by side: student solve rate over training (mean and spread) and the
in-band share; the frozen initial model's solve rate on problems of each stage (--frozen-model);
legal rate; unique concepts over time and their first appearance; concept overlap (Jaccard) and
ROUGE-L between stages; question and solution lengths; a 2-D map of problem embeddings by stage;
example problems with their solve rates per stage. A "stage" is one of --stages equal spans of steps.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import os
import random
import re
import sys
from collections import Counter, defaultdict
from typing import Optional

import numpy as np

SECTIONS = ["solve-rate", "frozen", "legal", "concepts", "overlap", "lengths", "map", "examples", "compare",
            "skipped"]


# --- text similarity -----------------------------------------------------------------------------

def tokens(text: str) -> list:
    """Lower-cased words and numbers, the unit ROUGE-L and the bag-of-words map count."""
    return re.findall(r"[a-z]+|\d+(?:\.\d+)?|[^\sa-z\d]", text.lower())


def lcs_len(a: list, b: list) -> int:
    """Length of the longest common subsequence (dynamic programming, one row kept)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 = 2 P R / (P + R), P = LCS / |b|, R = LCS / |a| over tokens(); 0 if either is empty."""
    ta, tb = tokens(a), tokens(b)
    if not ta or not tb:
        return 0.0
    lcs = lcs_len(ta, tb)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(tb), lcs / len(ta)
    return 2 * p * r / (p + r)


def mean_rouge_l(xs: list, ys: list, same: bool) -> Optional[float]:
    """Mean ROUGE-L F1 over all pairs (x, y); within one stage (same=True) only pairs of distinct items."""
    vals = [rouge_l(x, y) for i, x in enumerate(xs) for j, y in enumerate(ys) if not (same and j <= i)]
    return float(np.mean(vals)) if vals else None


def jaccard(a: set, b: set) -> Optional[float]:
    return len(a & b) / len(a | b) if a | b else None


def hashed_bow(texts: list, dim: int = 256) -> np.ndarray:
    """A cheap text embedding: counts of word unigrams and bigrams hashed (md5) into dim buckets."""
    out = np.zeros((len(texts), dim))
    for i, t in enumerate(texts):
        w = tokens(t)
        for g in w + [a + " " + b for a, b in zip(w, w[1:])]:
            out[i, int(hashlib.md5(g.encode()).hexdigest()[:8], 16) % dim] += 1.0
    return out


def pca_2d(x: np.ndarray) -> tuple:
    """(n, 2) coordinates on the first two principal components, and their explained-variance shares."""
    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return np.zeros((len(x), 2)), [0.0, 0.0]
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, vt.shape[0])
    coords = np.zeros((len(x), 2))
    coords[:, :k] = x @ vt[:k].T
    var = s ** 2
    share = (var[:2] / var.sum()).tolist() if var.sum() > 0 else [0.0, 0.0]
    return coords, (share + [0.0, 0.0])[:2]


# --- reading a run -------------------------------------------------------------------------------

def concept_key(c: str) -> str:
    return " ".join(str(c).lower().split())


def read_jsonl_stream(path: str, on_bad, desc: str = ""):
    """Yield (line number, dict) of a JSONL file, streaming; a line that is not a JSON object with an
    integer "step" (malformed, truncated) goes to on_bad(line number, reason) and is skipped."""
    from tqdm.auto import tqdm
    size = os.path.getsize(path)
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=desc, leave=False,
                                     disable=not desc) as bar:
        for n, raw in enumerate(f, start=1):
            bar.update(len(raw))
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                on_bad(n, f"not valid JSON ({err.__class__.__name__}: {str(err)[:80]})")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                on_bad(n, "no integer 'step' field")
                continue
            yield n, row


def _stat(xs: list) -> dict:
    if not xs:
        return {"n": 0, "mean": None, "std": None}
    return {"n": len(xs), "mean": float(np.mean(xs)), "std": float(np.std(xs))}


def read_run(run: str, sample_per_step: int, seed: int, progress: bool = True) -> dict:
    """One pass over problems.jsonl: per-step aggregates, concept first appearances, and a seeded
    reservoir sample of legal problems per step (for texts, examples, similarity and the map)."""
    path = os.path.join(run, "problems.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{run}: no problems.jsonl (is it the --out directory of an opensir.py run?)")
    cfg = {}
    if os.path.exists(os.path.join(run, "config.json")):
        try:
            cfg = json.load(open(os.path.join(run, "config.json")))
        except (OSError, json.JSONDecodeError) as err:
            print(f"warning: {run}/config.json unreadable ({err}); using default band", file=sys.stderr)
    import opensir as O
    lo, hi = cfg.get("band_lo", O.Config.band_lo), cfg.get("band_hi", O.Config.band_hi)
    bad = []

    def on_bad(n, why):
        bad.append({"file": "problems.jsonl", "line": n, "error": why})
        print(f"warning: {path} line {n}: {why}; skipped", file=sys.stderr)

    rng = random.Random(seed)
    steps = defaultdict(lambda: {"rows": 0, "legal": 0, "solve": [], "in_band": 0, "q_chars": [], "q_words": [],
                                 "sol_tokens": [], "teacher_chars": [], "concepts": set(), "seen": 0, "sample": []})
    first_seen, concept_count = {}, Counter()
    for n, row in read_jsonl_stream(path, on_bad, desc=f"{os.path.basename(run.rstrip('/'))} problems" if progress else ""):
        s = steps[row["step"]]
        s["rows"] += 1
        s["teacher_chars"].append(len(row.get("teacher_output") or ""))
        if not row.get("legal"):
            continue
        s["legal"] += 1
        prob = row.get("problem") or ""
        s["q_chars"].append(len(prob))
        s["q_words"].append(len(prob.split()))
        length = (row.get("rewards") or {}).get("length")
        if row.get("n_parsed", 0) > 0:
            sr = float(row.get("solve_rate", 0.0))
            s["solve"].append(sr)
            s["in_band"] += int(lo - 1e-9 <= sr <= hi + 1e-9)
            if length is not None:  # R_len = min(mean tokens, cap) / cap: mean tokens, capped
                s["sol_tokens"].append(length * cfg.get("len_cap", 1000))
        for c in row.get("concepts") or []:
            k = concept_key(c)
            s["concepts"].add(k)
            concept_count[k] += 1
            if k not in first_seen or row["step"] < first_seen[k]:
                first_seen[k] = row["step"]
        s["seen"] += 1  # reservoir sampling: every legal problem has the same chance to be kept
        item = {"problem": prob, "solve_rate": row.get("solve_rate"), "n_parsed": row.get("n_parsed", 0),
                "majority": row.get("majority"), "concepts": row.get("concepts") or [], "step": row["step"]}
        if len(s["sample"]) < sample_per_step:
            s["sample"].append(item)
        else:
            j = rng.randrange(s["seen"])
            if j < sample_per_step:
                s["sample"][j] = item
    metrics = {}
    mpath = os.path.join(run, "metrics.jsonl")
    if os.path.exists(mpath):
        def on_bad_m(n, why):
            bad.append({"file": "metrics.jsonl", "line": n, "error": why})
            print(f"warning: {mpath} line {n}: {why}; skipped", file=sys.stderr)
        for _, m in read_jsonl_stream(mpath, on_bad_m):
            metrics[m["step"]] = m
    return {"config": cfg, "steps": dict(steps), "first_seen": first_seen, "concept_count": concept_count,
            "metrics": metrics, "skipped": bad, "band": [lo, hi]}


def stage_bounds(steps: list, n_stages: int) -> list:
    """Split the sorted steps into at most n_stages contiguous spans of near-equal length: [[first, last]]."""
    steps = sorted(steps)
    if not steps:
        return []
    parts = np.array_split(np.array(steps), min(n_stages, len(steps)))
    return [[int(p[0]), int(p[-1])] for p in parts if len(p)]


# --- the frozen model ----------------------------------------------------------------------------

def frozen_solve_rates(model, tok, stage_problems: list, samples: int, max_new_tokens: int,
                       run_cfg: dict, seed: int, progress: bool = True) -> list:
    """The frozen initial model's majority-vote solve rate on each stage's problems, computed as the loop
    computes it: opensir.generate at the run's temperature, top-k and top-p, the last \\boxed{} of each
    solution, and majority_vote over the run's solve-rate denominator (recipe code or paper; run_cfg is
    the run's config.json, Config's defaults where it says nothing). Returns one list of rates per stage."""
    import torch

    import opensir as O
    get = lambda k: run_cfg.get(k, getattr(O.Config, k))  # noqa: E731
    torch.manual_seed(seed)
    rates = []
    for i, probs in enumerate(stage_problems):
        prompts = [O.chat(tok, O.student_prompt(p)) for p in probs for _ in range(samples)]
        outs = O.generate(model, tok, prompts, max_new_tokens, get("temperature"), top_k=get("top_k"),
                          top_p=get("top_p"), batch_size=64,
                          desc=f"frozen model, stage {i}" if progress else "") if prompts else []
        ans = [O.normalize_answer(O.final_answer(o.text)) for o in outs]
        rates.append([O.majority_vote(ans[j * samples: (j + 1) * samples], get("solve_rate_over"))[1]
                      for j in range(len(probs))])
    return rates


# --- the analysis ----------------------------------------------------------------------------------

def analyse_run(run: str, args) -> dict:
    r = read_run(run, args.sample_per_step, args.seed, progress=not args.quiet)
    steps = sorted(r["steps"])
    S = r["steps"]
    per_step = {"step": steps}
    cum, seen = [], set()
    by_step_first = Counter(r["first_seen"].values())
    for st in steps:
        seen |= S[st]["concepts"]
        cum.append(len(seen))
    per_step.update({
        "problems": [S[st]["rows"] for st in steps],
        "legal_rate": [S[st]["legal"] / S[st]["rows"] if S[st]["rows"] else None for st in steps],
        "solve_rate_mean": [_stat(S[st]["solve"])["mean"] for st in steps],
        "solve_rate_std": [_stat(S[st]["solve"])["std"] for st in steps],
        "in_band_share": [S[st]["in_band"] / len(S[st]["solve"]) if S[st]["solve"] else None for st in steps],
        "unique_concepts_cum": cum,
        "new_concepts": [by_step_first.get(st, 0) for st in steps],
        "question_words_mean": [_stat(S[st]["q_words"])["mean"] for st in steps],
        "solution_tokens_mean": [r["metrics"].get(st, {}).get("len/student") for st in steps],
    })
    stages = []
    for a, b in stage_bounds(steps, args.stages):
        in_st = [st for st in steps if a <= st <= b]
        solve = [x for st in in_st for x in S[st]["solve"]]
        rows = sum(S[st]["rows"] for st in in_st)
        legal = sum(S[st]["legal"] for st in in_st)
        sample = [it for st in in_st for it in S[st]["sample"]]
        sol_tok = [r["metrics"][st]["len/student"] for st in in_st if "len/student" in r["metrics"].get(st, {})]
        stages.append({
            "name": f"steps {a}-{b}", "steps": [a, b], "problems": rows, "legal": legal,
            "legal_rate": legal / rows if rows else None,
            "solve_rate": _stat(solve),
            "in_band_share": sum(S[st]["in_band"] for st in in_st) / len(solve) if solve else None,
            "question_words": _stat([x for st in in_st for x in S[st]["q_words"]]),
            "question_chars": _stat([x for st in in_st for x in S[st]["q_chars"]]),
            "solution_tokens_capped": _stat([x for st in in_st for x in S[st]["sol_tokens"]]),
            "solution_tokens_metrics": float(np.mean(sol_tok)) if sol_tok else None,
            "concepts": sorted(set().union(*[S[st]["concepts"] for st in in_st])),
            "_sample": sample,
        })
    # similarity between stages, on each stage's sample (bounded by --similarity-sample)
    rng = random.Random(args.seed)
    texts = [[it["problem"] for it in rng.sample(s["_sample"], min(args.similarity_sample, len(s["_sample"])))]
             for s in stages]
    k = len(stages)
    overlap = [[jaccard(set(stages[i]["concepts"]), set(stages[j]["concepts"])) for j in range(k)] for i in range(k)]
    rouge = [[mean_rouge_l(texts[i], texts[j], i == j) for j in range(k)] for i in range(k)]
    # examples: per stage, problems spread over the solve-rate range
    for s in stages:
        ok = sorted([it for it in s["_sample"] if it["n_parsed"]], key=lambda it: it["solve_rate"])
        pick = [ok[int(round(q * (len(ok) - 1)))] for q in np.linspace(0, 1, min(args.examples, len(ok)))] if ok else []
        s["examples"] = [{k2: it[k2] for k2 in ("step", "problem", "solve_rate", "majority", "concepts")}
                         for it in {id(it): it for it in pick}.values()]
    # the frozen model, and the embedding map
    map_items = []
    for i, s in enumerate(stages):
        pool = [it for it in s["_sample"]]
        random.Random(args.seed + i).shuffle(pool)
        map_items.append(pool[: args.map_per_stage])
    frozen, model = None, None
    if args.frozen_model:
        import opensir as O
        model, tok = O.load_model(args.frozen_model, device=args.device)
        fz_probs = [[it["problem"] for it in items[: args.frozen_problems]] for items in map_items]
        mnt = args.frozen_max_new_tokens or r["config"].get("student_max_new_tokens", 512)
        rates = frozen_solve_rates(model, tok, fz_probs, args.frozen_samples, mnt, r["config"], args.seed,
                                   not args.quiet)
        for s, rs in zip(stages, rates):
            s["frozen_solve_rate"] = _stat(rs)
        frozen = {"model": args.frozen_model, "samples": args.frozen_samples, "max_new_tokens": mnt,
                  "problems_per_stage": args.frozen_problems}
    map_texts = [it["problem"] for items in map_items for it in items]
    map_stage = [i for i, items in enumerate(map_items) for _ in items]
    if model is not None and map_texts:
        emb = O.embed_texts(model, tok, map_texts).numpy()
        method = f"PCA of {args.frozen_model}'s mean-pooled last hidden states (the diversity embedding)"
    else:
        emb = hashed_bow(map_texts)
        method = "PCA of hashed bag-of-words counts (unigrams + bigrams, 256 buckets): a cheap text embedding, not the model's"
    coords, share = pca_2d(emb) if map_texts else (np.zeros((0, 2)), [0.0, 0.0])
    for s in stages:
        del s["_sample"]
    first = sorted(r["first_seen"].items(), key=lambda kv: (kv[1], -r["concept_count"][kv[0]], kv[0]))
    return {
        "run": run, "label": os.path.basename(os.path.abspath(run)), "band": r["band"],
        "config": {k2: r["config"].get(k2) for k2 in ("model", "recipe", "seed", "steps", "lr", "w_div", "w_len",
                                                      "band_lo", "band_hi", "student_group", "rounds_per_step")
                   if k2 in r["config"]},
        "skipped_lines": r["skipped"], "per_step": per_step, "stages": stages,
        "summary": {
            "steps": len(steps), "problems": sum(S[st]["rows"] for st in steps),
            "legal_rate": (sum(S[st]["legal"] for st in steps) / max(sum(S[st]["rows"] for st in steps), 1)),
            "solve_rate": _stat([x for st in steps for x in S[st]["solve"]]),
            "in_band_share": (sum(S[st]["in_band"] for st in steps) / max(sum(len(S[st]["solve"]) for st in steps), 1)),
            "unique_concepts": len(r["first_seen"]),
        },
        "concepts_first_seen": [{"concept": c, "step": st, "count": r["concept_count"][c]} for c, st in first],
        "concept_overlap": overlap, "rouge_l": rouge, "similarity_sample": args.similarity_sample,
        "frozen": frozen,
        "map": {"method": method, "explained_variance": share,
                "points": [[float(x), float(y), int(si)] for (x, y), si in zip(coords, map_stage)]},
    }


# --- figures and the page -----------------------------------------------------------------------------

def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def make_figures(runs: list, out: str) -> dict:
    """PNG files under out; returns {name: base64 png}. Empty without matplotlib."""
    plt = _plt()
    if plt is None:
        return {}
    figs = {}

    def save(fig, name):
        path = os.path.join(out, f"fig_{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        figs[name] = base64.b64encode(open(path, "rb").read()).decode()

    def nz(xs):
        return [np.nan if x is None else x for x in xs]

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in runs:
        ps = r["per_step"]
        m, sd = np.array(nz(ps["solve_rate_mean"]), float), np.array(nz(ps["solve_rate_std"]), float)
        line, = axes[0].plot(ps["step"], m, label=r["label"])
        axes[0].fill_between(ps["step"], m - sd, m + sd, alpha=0.15, color=line.get_color())
        axes[1].plot(ps["step"], nz(ps["in_band_share"]), label=r["label"])
    for ax, t in zip(axes, ["student solve rate (mean ± sd over problems)", "in-band share"]):
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    save(fig, "solve_rate")
    if any(s.get("frozen_solve_rate") for r in runs for s in r["stages"]):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for r in runs:
            xs = [i for i, s in enumerate(r["stages"]) if s.get("frozen_solve_rate", {}).get("mean") is not None]
            ax.errorbar(xs, [r["stages"][i]["frozen_solve_rate"]["mean"] for i in xs],
                        [r["stages"][i]["frozen_solve_rate"]["std"] / np.sqrt(r["stages"][i]["frozen_solve_rate"]["n"])
                         for i in xs], marker="o", capsize=3, label=r["label"])
        ax.set_title("frozen initial model: solve rate by stage (± SE)", fontsize=10)
        ax.set_xlabel("stage")
        ax.legend(fontsize=7)
        save(fig, "frozen")
    def per_step_pair(name, panels):
        """Two per-step line plots side by side, one line per run: panels = [(per_step key, title)] x 2."""
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, (key, title) in zip(axes, panels):
            for r in runs:
                ax.plot(r["per_step"]["step"], nz(r["per_step"][key]), label=r["label"])
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        save(fig, name)

    per_step_pair("legal_concepts", [("legal_rate", "legal rate of teacher outputs"),
                                     ("unique_concepts_cum", "unique concepts explored (cumulative)")])
    per_step_pair("lengths", [("question_words_mean", "question length (words)"),
                              ("solution_tokens_mean", "student solution length (tokens, metrics.jsonl)")])
    for i, r in enumerate(runs):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, key, t in zip(axes, ["concept_overlap", "rouge_l"], ["concept overlap (Jaccard)", "ROUGE-L F1"]):
            mat = np.array([[np.nan if v is None else v for v in row] for row in r[key]], float)
            im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{r['label']}: {t} between stages", fontsize=9)
            ax.set_xlabel("stage")
            ax.set_ylabel("stage")
            fig.colorbar(im, ax=ax)
        save(fig, f"overlap_{i}")
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        pts = np.array(r["map"]["points"], float).reshape(-1, 3)
        for si, s in enumerate(r["stages"]):
            sel = pts[:, 2] == si
            ax.scatter(pts[sel, 0], pts[sel, 1], s=10, alpha=0.6, label=s["name"])
        ax.set_title(f"{r['label']}: problems by stage (PCA)", fontsize=9)
        ax.legend(fontsize=7)
        save(fig, f"map_{i}")
    return figs


def _fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(head: list, rows: list) -> str:
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")


def _img(figs: dict, name: str) -> str:
    return f'<img src="data:image/png;base64,{figs[name]}" alt="{name}">' if name in figs else ""


def write_html(runs: list, figs: dict, path: str, note: str) -> None:
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>OpenSIR curriculum report</title><style>"
         "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse;"
         "margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}"
         "</style></head><body><h1>OpenSIR curriculum report</h1>",
         f"<p>Runs: {', '.join(html.escape(r['run']) for r in runs)}. {html.escape(note)}</p>"]

    def sec(sid, title):
        h.append(f'<h2 id="{sid}">{html.escape(title)}</h2>')

    sec("solve-rate", "Student solve rate and in-band share")
    h.append(_img(figs, "solve_rate"))
    for r in runs:
        h.append(f"<h3>{html.escape(r['label'])}</h3>" + _table(
            ["stage", "legal problems", "solve rate mean", "sd", "in-band share"],
            [[s["name"], s["solve_rate"]["n"], s["solve_rate"]["mean"], s["solve_rate"]["std"], s["in_band_share"]]
             for s in r["stages"]]))
    sec("frozen", "Frozen initial model's solve rate on each stage's problems")
    if any(r["frozen"] for r in runs):
        h.append(_img(figs, "frozen"))
        for r in runs:
            if r["frozen"]:
                f = r["frozen"]
                h.append(f"<p>{html.escape(r['label'])}: {f['model']}, {f['samples']} samples per problem, up to "
                         f"{f['problems_per_stage']} problems per stage, majority-vote solve rate.</p>" + _table(
                             ["stage", "problems", "frozen solve rate", "sd"],
                             [[s["name"], s["frozen_solve_rate"]["n"], s["frozen_solve_rate"]["mean"],
                               s["frozen_solve_rate"]["std"]] for s in r["stages"]]))
    else:
        h.append("<p>Not measured: pass --frozen-model (e.g. the run's --model) to load the initial model.</p>")
    sec("legal", "Legal rate")
    h.append(_img(figs, "legal_concepts"))
    h.append(_table(["run"] + [f"stage {i}" for i in range(max(len(r["stages"]) for r in runs))],
                    [[r["label"]] + [s["legal_rate"] for s in r["stages"]] for r in runs]))
    sec("concepts", "Unique concepts explored and their first appearance")
    for r in runs:
        h.append(f"<h3>{html.escape(r['label'])}: {r['summary']['unique_concepts']} unique concepts</h3>")
        h.append(_table(["stage", "unique concepts in stage"], [[s["name"], len(s["concepts"])] for s in r["stages"]]))
        h.append("<p>First appearances (first 40, by step):</p>" + _table(
            ["concept", "first step", "times used"],
            [[c["concept"], c["step"], c["count"]] for c in r["concepts_first_seen"][:40]]))
    sec("overlap", "Concept overlap and ROUGE-L between stages")
    for i, r in enumerate(runs):
        names = [s["name"] for s in r["stages"]]
        h.append(f"<h3>{html.escape(r['label'])}</h3>" + _img(figs, f"overlap_{i}"))
        h.append("<p>Concept overlap (Jaccard of the stages' concept sets):</p>"
                 + _table([""] + names, [[n] + row for n, row in zip(names, r["concept_overlap"])]))
        h.append(f"<p>Mean ROUGE-L F1 over pairs of problems (up to {r['similarity_sample']} sampled per stage; "
                 "diagonal: distinct pairs within the stage):</p>"
                 + _table([""] + names, [[n] + row for n, row in zip(names, r["rouge_l"])]))
    sec("lengths", "Question and solution lengths")
    h.append(_img(figs, "lengths"))
    for r in runs:
        h.append(f"<h3>{html.escape(r['label'])}</h3>" + _table(
            ["stage", "question words", "question chars", "solution tokens (metrics)",
             "solution tokens (from length reward, capped)"],
            [[s["name"], s["question_words"]["mean"], s["question_chars"]["mean"], s["solution_tokens_metrics"],
              s["solution_tokens_capped"]["mean"]] for s in r["stages"]]))
    sec("map", "2-D map of problem embeddings by stage")
    for i, r in enumerate(runs):
        ev = r["map"]["explained_variance"]
        h.append(f"<h3>{html.escape(r['label'])}</h3><p>{html.escape(r['map']['method'])}; "
                 f"{len(r['map']['points'])} problems; PC1 {ev[0]:.1%}, PC2 {ev[1]:.1%} of variance.</p>"
                 + _img(figs, f"map_{i}"))
    sec("examples", "Example problems with their solve rates, per stage")
    for r in runs:
        h.append(f"<h3>{html.escape(r['label'])}</h3>")
        for s in r["stages"]:
            h.append(f"<h4>{html.escape(s['name'])}</h4>" + _table(
                ["step", "solve rate", "majority", "concepts", "problem"],
                [[e["step"], e["solve_rate"], e["majority"], ", ".join(e["concepts"]), e["problem"]]
                 for e in s["examples"]]))
    sec("compare", "Runs side by side")
    h.append(_table(["run", "steps", "problems", "legal rate", "solve rate", "sd", "in-band share",
                     "unique concepts", "config"],
                    [[r["label"], r["summary"]["steps"], r["summary"]["problems"], r["summary"]["legal_rate"],
                      r["summary"]["solve_rate"]["mean"], r["summary"]["solve_rate"]["std"],
                      r["summary"]["in_band_share"], r["summary"]["unique_concepts"],
                      json.dumps(r["config"])] for r in runs]))
    sec("skipped", "Skipped lines")
    bad = [[r["label"], b["file"], b["line"], b["error"]] for r in runs for b in r["skipped_lines"]]
    h.append(_table(["run", "file", "line", "why"], bad) if bad else "<p>None.</p>")
    h.append("</body></html>")
    with open(path, "w") as f:
        f.write("\n".join(h))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Curriculum report of one or more opensir.py runs.")
    p.add_argument("runs", nargs="+", help="run directories (opensir.py --out)")
    p.add_argument("--out", required=True, help="report directory (report.html, report.json, fig_*.png)")
    p.add_argument("--stages", type=int, default=4, help="number of equal spans of steps compared")
    p.add_argument("--sample-per-step", type=int, default=32, help="legal problems kept per step (reservoir)")
    p.add_argument("--similarity-sample", type=int, default=60, help="problems per stage for ROUGE-L")
    p.add_argument("--map-per-stage", type=int, default=150, help="problems per stage on the 2-D map")
    p.add_argument("--examples", type=int, default=5, help="example problems per stage")
    p.add_argument("--frozen-model", default="", help="load this model (the run's --model) and measure its "
                   "solve rate on each stage's problems; also embeds the map with it")
    p.add_argument("--frozen-problems", type=int, default=32, help="problems per stage for the frozen model")
    p.add_argument("--frozen-samples", type=int, default=8, help="samples per problem for the frozen model")
    p.add_argument("--frozen-max-new-tokens", type=int, default=0, help="0: the run's student_max_new_tokens")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples and the frozen model's sampling")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[list] = None) -> dict:
    args = build_parser().parse_args(argv)
    for name in ("stages", "sample_per_step", "similarity_sample", "map_per_stage", "frozen_problems",
                 "frozen_samples"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    for run in args.runs:
        if not os.path.exists(os.path.join(run, "problems.jsonl")):
            raise SystemExit(f"{run}: no problems.jsonl (is it the --out directory of an opensir.py run?)")
    if args.frozen_model:
        import models
        if models.model_name_error(args.frozen_model):
            raise SystemExit(models.model_name_error(args.frozen_model))
    os.makedirs(args.out, exist_ok=True)
    runs = [analyse_run(run, args) for run in args.runs]
    figs = make_figures(runs, args.out)
    note = ("" if figs or _plt() is not None else
            "matplotlib is not installed, so this report has tables only (pip install -r requirements-plots.txt).")
    write_html(runs, figs, os.path.join(args.out, "report.html"), note)
    report = {"runs": runs, "figures": sorted(f"fig_{k}.png" for k in figs)}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}/report.html, report.json and {len(figs)} figures")
    return report


if __name__ == "__main__":
    main()
