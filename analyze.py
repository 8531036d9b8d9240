"""The curriculum report: the paper's analyses of one run, or of several overlaid, drawn from their logs.

    python analyze.py RUN_DIR [RUN_DIR ...] --out REPORT_DIR [--frozen-model MODEL]
                      [--difficulty auto|none|toy|field:NAME|MODULE:FUNC] [--truth auto|none|toy|MODULE:FUNC]
    python analyze.py RUN_A --compare RUN_B RUN_C --out REPORT_DIR     (the same as listing all three)

Reads each run's problems.jsonl (streamed line by line: a paper-scale run writes gigabytes),
metrics.jsonl, config.json and, where the run saved them, its student solutions (solutions.jsonl.gz
or solutions.jsonl: one JSON line per problem with step, round, problem, majority, answers,
solutions). Writes REPORT_DIR/report.html (one self-contained page, plots embedded, every string from
a run or the command line escaped), REPORT_DIR/report.json (every number shown) and
REPORT_DIR/fig_*.png. Plots need matplotlib (optional: `pip install -r requirements-plots.txt`);
without it the tables are still written. A file in REPORT_DIR that is a symbolic link (or anything
but a plain file) is refused, never written through.

Sections, per run and overlaid, after a first-stage-to-last-stage summary: training curves from
metrics.jsonl; student solve rate (mean ± SE) and the in-band share, with the frozen initial model as
the step-0 reference; the difficulty mix over time and mean difficulty per stage (± SE); the majority
label's accuracy over time and by difficulty where a truth function is given (the frozen model's as
the step-0 reference); the frozen initial model's solve rate per stage (± SE, with its linear trend);
legal rate; concepts over time, well-formed strings apart from malformed ones; concept overlap
(Jaccard) and ROUGE-L between stages; question and solution lengths; a 2-D map of problems coloured
by stage and by difficulty; example problems; a few saved student solutions. A "stage" is one of
--stages equal spans of steps. Lines of the logs that are not JSON objects with the fields' expected
types are skipped, counted and listed.

Difficulty labels (--difficulty): `toy` is the toy world's rung (tiny.toy_rung: 0-4, None off the
templates); `field:NAME` reads the field NAME of each problems.jsonl row; `MODULE:FUNC` imports FUNC
from MODULE and calls it on each legal problem's text, which returns a label (a number, or a string
for unordered categories) or None; `auto` (the default) is `toy` for runs of `--model toy`, else none.
In the mix, more than 12 distinct numbers are shown in 8 equal-width bins, and the rarest strings beyond
12 as "other labels"; means and SEs use the values themselves.
The truth (--truth) works the same way: `toy` is tiny.toy_answer, `MODULE:FUNC` returns the true
answer of a problem text or None where it is unknown; label accuracy is the share of problems with a
known truth and a majority answer whose majority equals the truth (both through the vote key).
"""
from __future__ import annotations

import argparse
import base64
import difflib
import errno
import gzip
import hashlib
import html
import importlib
import io
import json
import math
import os
import random
import re
import stat
import sys
import zlib
from collections import Counter, defaultdict
from typing import Callable, Optional

import numpy as np

SECTIONS = ["curves", "solve-rate", "difficulty", "labels", "frozen", "legal", "concepts", "overlap", "lengths",
            "map", "examples", "solutions", "compare", "skipped"]
DEFAULT_CURVES = ["solve_rate/mean", "student/agree", "teacher/reward", "teacher/legal_rate", "teacher/diversity",
                  "len/student", "train/student_adv_abs", "pool"]


# --- writing files: never through a link -----------------------------------------------------------

def safe_write(out: str, name: str, data: bytes) -> str:
    """Write data to out/name. An existing out/name that is a symbolic link, a FIFO or anything but a plain
    file is refused (SystemExit naming it), never followed: O_NOFOLLOW closes the gap between check and open."""
    path = os.path.join(out, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a plain file"
        raise SystemExit(f"{path} is {kind}: analyze.py never writes through it; remove it or choose another --out")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK, errno.ENXIO):
            raise SystemExit(f"{path} became a symbolic link or special file: refused, nothing written") from None
        raise
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


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


# --- statistics ----------------------------------------------------------------------------------------

def _stat(xs: list) -> dict:
    """n, mean, SD (population, as np.std) and SE of the mean (sample SD / sqrt n; None below 2)."""
    if not xs:
        return {"n": 0, "mean": None, "std": None, "se": None}
    se = float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else None
    return {"n": len(xs), "mean": float(np.mean(xs)), "std": float(np.std(xs)), "se": se}


def trend(xs: list, ys: list) -> Optional[dict]:
    """Least-squares slope of ys on xs and its standard error (None with fewer than 3 points or one x)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(x) < 3 or np.ptp(x) == 0:
        return None
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc ** 2).sum())
    resid = y - y.mean() - slope * xc
    se = float(math.sqrt((resid ** 2).sum() / (len(x) - 2) / (xc ** 2).sum()))
    return {"slope": slope, "se": se, "n": len(x)}


def smooth(xs: list, window: int) -> list:
    """Trailing moving average over the last `window` values that are not None (None stays None)."""
    if window <= 1:
        return list(xs)
    out, buf = [], []
    for x in xs:
        if x is None:
            out.append(None)
            continue
        buf = (buf + [x])[-window:]
        out.append(float(np.mean(buf)))
    return out


# --- concepts: well-formed or malformed --------------------------------------------------------------------

def concept_key(c: str) -> str:
    return " ".join(str(c).lower().split())


_DOUBLED = re.compile(r"([a-z]{3,})\1")
_MARKUP = re.compile(r"[<>{}\\|`$]")


def malformed_why(c: str, more_frequent: list) -> Optional[str]:
    """Why a concept string looks malformed (a broken copy of a concept, not a new topic), or None. A heuristic:
    no letters; markup characters; more than 8 words or 80 characters; a fragment written twice in a row
    (`numbersnumbers`); a truncated prefix of a more frequent concept (`mult`); or a near-copy of one
    (difflib ratio >= 0.85, `multiplcation`). more_frequent: concepts used more often, most frequent first,
    as strings or as difflib.SequenceMatcher objects holding them as their second sequence (faster)."""
    if not re.search(r"[a-z]", c):
        return "no letters"
    if _MARKUP.search(c):
        return "markup characters"
    if len(c) > 80 or len(c.split()) > 8:
        return "too long for a concept"
    if _DOUBLED.search(c.replace(" ", "")):
        return "a fragment written twice"
    for m in more_frequent:
        d = m.b if isinstance(m, difflib.SequenceMatcher) else m
        if d.startswith(c) and d[len(c)].isalpha() and c[-1].isalpha():
            return f"a truncated '{d}'"
        if 2 * min(len(c), len(d)) < 0.85 * (len(c) + len(d)):  # difflib's upper bound, without its set-up
            continue
        if not isinstance(m, difflib.SequenceMatcher):
            m = difflib.SequenceMatcher(None, c, d, autojunk=False)
        m.set_seq1(c)
        if m.quick_ratio() >= 0.85 and m.ratio() >= 0.85:
            return f"a near-copy of '{d}'"
    return None


def classify_concepts(counts: Counter, vocab: Optional[set] = None, compare_top: int = 50) -> dict:
    """{concept: {"kind": "vocabulary" | "other" | "malformed", "why": ...}}: "vocabulary" only where a vocabulary
    is known (the toy world's, or --concept-vocab); other strings are "malformed" by malformed_why() or, with a
    vocabulary, when they are whole words cut out of one of its concepts (`numbers`), else
    "other" (well-formed: a new topic, or a known one in other words). Each string is compared with at most the
    compare_top most frequent concepts, so a run with many thousands of distinct strings stays fast."""
    order = sorted(counts, key=lambda c: (-counts[c], c))
    top = [c for c in order if vocab is None or c in vocab][:compare_top]
    matchers = []
    for d in top:
        m = difflib.SequenceMatcher(None, autojunk=False)
        m.set_seq2(d)
        matchers.append(m)
    out = {}
    for c in order:
        if vocab is not None and c in vocab:
            out[c] = {"kind": "vocabulary", "why": None}
            continue
        why = malformed_why(c, [m for m in matchers if counts[m.b] > counts[c]])
        if why is None and vocab is not None:  # a closed vocabulary: a piece of one of its concepts is broken
            whole = next((d for d in top if f" {c} " in f" {d} "), None)
            why = f"a fragment of '{whole}'" if whole else None
        out[c] = {"kind": "malformed" if why else "other", "why": why}
    return out


# --- difficulty labels and truth ---------------------------------------------------------------------

def _import_func(spec: str, flag: str) -> Callable:
    mod, _, fn = spec.rpartition(":")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as err:
        raise SystemExit(f"{flag} {spec}: cannot import {fn} from {mod} ({err})") from None
    if not callable(f):
        raise SystemExit(f"{flag} {spec}: {fn} is not callable")
    return f


def check_label_spec(spec: str, flag: str, fields: bool) -> None:
    """Refuse a malformed --difficulty / --truth before any run is read."""
    ok = spec in ("auto", "none", "toy") or (fields and spec.startswith("field:") and len(spec) > 6) \
        or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec or "")
    if not ok or (not fields and spec.startswith("field:")):
        raise SystemExit(f"{flag} {spec!r}: expected auto, none, toy, {'field:NAME, ' if fields else ''}or MODULE:FUNC")
    if ":" in spec and not spec.startswith("field:"):
        _import_func(spec, flag)


def make_labeler(spec: str, cfg: dict, kind: str) -> tuple:
    """(function of a problems.jsonl row -> value or None, description) for --difficulty (kind "difficulty")
    or --truth (kind "truth"); (None, "") when there is none. auto: the toy world's for a --model toy run."""
    if spec == "auto":
        spec = "toy" if cfg.get("model") == "toy" else "none"
    if spec == "none":
        return None, ""
    if spec == "toy":
        import tiny as T
        f = T.toy_rung if kind == "difficulty" else T.toy_answer
        return (lambda row: f(row.get("problem"))), ("the toy world's rung (0-4)" if kind == "difficulty"
                                                     else "the toy world's true answer")
    if spec.startswith("field:"):
        name = spec[6:]
        return (lambda row: row.get(name)), f"the field '{name}' of each problems.jsonl row"
    f = _import_func(spec, f"--{kind}")
    return (lambda row: f(row.get("problem"))), f"{spec}(problem text)"


def _label_value(v):
    """A usable label: a finite number (not bool) or a non-empty string; anything else is no label."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, str) and v.strip():
        return v.strip()
    return None


# --- reading a run -------------------------------------------------------------------------------

def read_jsonl_stream(path: str, on_bad, desc: str = "", check=None):
    """Yield (line number, dict) of a JSONL file (gzip if the name ends in .gz), streaming; a line that is not
    a JSON object with an integer "step" (malformed, truncated), or for which check(row) names a wrong-typed
    field, goes to on_bad(line number, reason) and is skipped."""
    from tqdm.auto import tqdm
    size = os.path.getsize(path)
    gz = path.endswith(".gz")
    with open(path, "rb") as raw_f, (gzip.open(raw_f, "rb") if gz else raw_f) as f, \
            tqdm(total=size, unit="B", unit_scale=True, desc=desc, leave=False, disable=not desc) as bar:
        n = 0
        while True:
            try:
                raw = f.readline()
            except (OSError, EOFError, zlib.error) as err:  # a truncated or corrupt .gz
                on_bad(n + 1, f"unreadable ({err.__class__.__name__}); the rest of the file skipped")
                return
            if not raw:
                break
            n += 1
            bar.update(raw_f.tell() - bar.n)
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
                on_bad(n, f"not valid JSON ({err.__class__.__name__}: {str(err)[:80]})")
                continue
            if not isinstance(row, dict) or not _is_int(row.get("step")):
                on_bad(n, "no integer 'step' field")
                continue
            why = check(row) if check else None
            if why:
                on_bad(n, why)
                continue
            yield n, row


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _wrong(row: dict, key: str, ok, want: str) -> Optional[str]:
    v = row.get(key)
    if v is None or ok(v):
        return None
    return f"field '{key}' is {type(v).__name__}, expected {want}"


def check_problem_row(row: dict) -> Optional[str]:
    """The reason a problems.jsonl row cannot be used (a field of the wrong type), or None. Missing fields and
    nulls are allowed: they read as absent."""
    checks = [("round", _is_int, "an integer"), ("legal", lambda v: isinstance(v, bool), "true or false"),
              ("problem", lambda v: isinstance(v, str), "a string"),
              ("concepts", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of strings"),
              ("solve_rate", lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
              ("n_parsed", lambda v: _is_int(v) and v >= 0, "a count"),
              ("majority", lambda v: isinstance(v, str) or _is_num(v), "a string"),
              ("rewards", lambda v: isinstance(v, dict) and (v.get("length") is None or _is_num(v["length"])),
               "an object with a numeric 'length'"),
              ("teacher_output", lambda v: isinstance(v, str), "a string")]
    for key, ok, want in checks:
        why = _wrong(row, key, ok, want)
        if why:
            return why
    return None


def check_solution_row(row: dict) -> Optional[str]:
    """As check_problem_row, for solutions.jsonl(.gz) rows."""
    checks = [("round", _is_int, "an integer"), ("problem", lambda v: isinstance(v, str), "a string"),
              ("majority", lambda v: isinstance(v, str) or _is_num(v), "a string"),
              ("answers", lambda v: isinstance(v, list) and all(a is None or isinstance(a, str) or _is_num(a)
                                                                for a in v), "a list of answers"),
              ("solutions", lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of strings")]
    for key, ok, want in checks:
        why = _wrong(row, key, ok, want)
        if why:
            return why
    if not isinstance(row.get("problem"), str) or not isinstance(row.get("solutions"), list):
        return "no 'problem' text or no 'solutions' list"
    return None


def solutions_file(run: str) -> Optional[str]:
    for name in ("solutions.jsonl.gz", "solutions.jsonl"):
        if os.path.isfile(os.path.join(run, name)):
            return os.path.join(run, name)
    return None


def read_run(run: str, sample_per_step: int, seed: int, progress: bool = True, difficulty: str = "auto",
             truth: str = "auto", n_solutions: int = 3) -> dict:
    """One pass over problems.jsonl: per-step aggregates (difficulty labels and label accuracy included),
    concept first appearances, and a seeded reservoir sample of legal problems per step (for texts, examples,
    similarity and the map); metrics.jsonl by step; a seeded reservoir of saved student solutions."""
    path = os.path.join(run, "problems.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{run}: no problems.jsonl (is it the --out directory of an opensir.py run?)")
    cfg = {}
    if os.path.exists(os.path.join(run, "config.json")):
        try:
            with open(os.path.join(run, "config.json")) as f:
                cfg = json.load(f)
            if not isinstance(cfg, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, UnicodeDecodeError) as err:
            print(f"warning: {run}/config.json unreadable ({err}); using default band", file=sys.stderr)
            cfg = {}
    import opensir as O
    lo, hi = cfg.get("band_lo", O.Config.band_lo), cfg.get("band_hi", O.Config.band_hi)
    if not (_is_num(lo) and _is_num(hi)):
        lo, hi = O.Config.band_lo, O.Config.band_hi
    len_cap = cfg.get("len_cap", 1000) if _is_num(cfg.get("len_cap", 1000)) else 1000
    diff_f, diff_desc = make_labeler(difficulty, cfg, "difficulty")
    truth_f, truth_desc = make_labeler(truth, cfg, "truth")
    from checker import normalize_answer
    bad, bad_per_file = [], Counter()
    label_errors = Counter()

    def on_bad_for(fname, p):
        def on_bad(n, why):  # every one is listed in the report; the first 10 of a file also on stderr
            bad.append({"file": fname, "line": n, "error": why})
            bad_per_file[fname] += 1
            if bad_per_file[fname] <= 10:
                print(f"warning: {p} line {n}: {why}; skipped", file=sys.stderr)
        return on_bad

    def call(f, row, what):
        try:
            return f(row)
        except Exception as err:  # a user's function: one failure must not end the report
            label_errors[f"{what}: {err.__class__.__name__}"] += 1
            return None

    rng = random.Random(seed)
    steps = defaultdict(lambda: {"rows": 0, "legal": 0, "solve": [], "in_band": 0, "q_chars": [], "q_words": [],
                                 "sol_tokens": [], "concepts": set(), "seen": 0, "sample": [],
                                 "difficulty": Counter(), "diff_values": [], "label_ok": 0, "label_n": 0,
                                 "label_ok_by": Counter(), "label_n_by": Counter()})
    first_seen, concept_count = {}, Counter()
    desc = f"{os.path.basename(run.rstrip('/'))} problems" if progress else ""
    for n, row in read_jsonl_stream(path, on_bad_for("problems.jsonl", path), desc=desc, check=check_problem_row):
        s = steps[row["step"]]
        s["rows"] += 1
        if not row.get("legal"):
            continue
        s["legal"] += 1
        prob = row.get("problem") or ""
        s["q_chars"].append(len(prob))
        s["q_words"].append(len(prob.split()))
        length = (row.get("rewards") or {}).get("length")
        n_parsed = row.get("n_parsed") or 0
        sr = row.get("solve_rate")
        if n_parsed > 0 and sr is not None:
            s["solve"].append(float(sr))
            s["in_band"] += int(lo - 1e-9 <= sr <= hi + 1e-9)
            if length is not None:  # R_len = min(mean tokens, cap) / cap: mean tokens, capped
                s["sol_tokens"].append(length * len_cap)
        label = _label_value(call(diff_f, row, "--difficulty")) if diff_f else None
        if diff_f:
            s["difficulty"][label] += 1
            if isinstance(label, float):
                s["diff_values"].append(label)
        truth_v = call(truth_f, row, "--truth") if truth_f else None
        correct = None
        if truth_v is not None and n_parsed > 0 and row.get("majority") is not None:
            correct = normalize_answer(str(row["majority"])) == normalize_answer(str(truth_v))
            s["label_n"] += 1
            s["label_ok"] += int(correct)
            s["label_ok_by"][label] += int(correct)
            s["label_n_by"][label] += 1
        for c in row.get("concepts") or []:
            k = concept_key(c)
            s["concepts"].add(k)
            concept_count[k] += 1
            if k not in first_seen or row["step"] < first_seen[k]:
                first_seen[k] = row["step"]
        s["seen"] += 1  # reservoir sampling: every legal problem has the same chance to be kept
        item = {"problem": prob, "solve_rate": sr, "n_parsed": n_parsed, "majority": row.get("majority"),
                "concepts": row.get("concepts") or [], "step": row["step"], "difficulty": label,
                "truth": None if truth_v is None else str(truth_v), "label_correct": correct}
        if len(s["sample"]) < sample_per_step:
            s["sample"].append(item)
        else:
            j = rng.randrange(s["seen"])
            if j < sample_per_step:
                s["sample"][j] = item
    for what, k in label_errors.items():
        print(f"warning: {run}: {what} on {k} problems; counted as unlabelled", file=sys.stderr)
    metrics = {}
    mpath = os.path.join(run, "metrics.jsonl")
    if os.path.exists(mpath):
        for ln, m in read_jsonl_stream(mpath, on_bad_for("metrics.jsonl", mpath)):
            for k in sorted(set(m) & set(DEFAULT_CURVES)):
                if not _is_num(m[k]) and m[k] is not None:
                    on_bad_for("metrics.jsonl", mpath)(ln, f"field '{k}' is {type(m[k]).__name__}, expected a "
                                                          "number; that value left out")
            metrics[m["step"]] = {k: v for k, v in m.items() if _is_num(v)}  # text and lists: not plotted
    solutions, n_sol = [], 0
    spath = solutions_file(run)
    if spath and n_solutions > 0:
        srng = random.Random(seed + 1)
        for _, row in read_jsonl_stream(spath, on_bad_for(os.path.basename(spath), spath),
                                        check=check_solution_row):
            n_sol += 1
            if len(solutions) < n_solutions:
                solutions.append(row)
            else:
                j = srng.randrange(n_sol)
                if j < n_solutions:
                    solutions[j] = row
        solutions.sort(key=lambda r: (r["step"], r.get("round") or 0))
        if truth_f:
            for row in solutions:
                t = call(truth_f, row, "--truth")
                row["_truth"] = None if t is None else str(t)
    for fname, k in bad_per_file.items():
        if k > 10:
            print(f"warning: {run}/{fname}: {k} lines skipped in all (report.json lists each)", file=sys.stderr)
    return {"config": cfg, "steps": dict(steps), "first_seen": first_seen, "concept_count": concept_count,
            "metrics": metrics, "skipped": bad, "band": [lo, hi], "difficulty_desc": diff_desc,
            "truth_desc": truth_desc, "label_errors": dict(label_errors), "solutions": solutions,
            "solutions_total": n_sol, "solutions_file": os.path.basename(spath) if spath else None}


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
    the run's config.json, Config's defaults where it says nothing). Returns per stage a list of
    (solve rate, majority answer) per problem."""
    import engines
    import opensir as O

    def get(k):  # the run's value where it has the type of Config's default (a hand-edited config.json)
        v, d = run_cfg.get(k), getattr(O.Config, k)
        return v if isinstance(v, type(d)) or (isinstance(d, float) and _is_num(v)) else d
    engine = engines.HFEngine(model, O.eos_token_ids(model, tok), tok.pad_token_id, 64)
    sampling = engines.Sampling(get("temperature"), get("top_k"), get("top_p"))
    rates = []
    for i, probs in enumerate(stage_problems):
        prompts = [O.chat(tok, O.student_prompt(p)) for p in probs for _ in range(samples)]
        seeds = [O.sample_seed(seed, 0, i, 1, j) for j in range(len(prompts))]  # one stream per sample
        outs = O.generate(engine, tok, prompts, max_new_tokens, sampling, seeds,
                          desc=f"frozen model, stage {i}" if progress else "") if prompts else []
        ans = [O.normalize_answer(O.final_answer(o.text)) for o in outs]
        votes = [O.majority_vote(ans[j * samples: (j + 1) * samples], get("solve_rate_over")) for j in range(len(probs))]
        rates.append([(v[1], v[0]) for v in votes])
    return rates


# --- the analysis ----------------------------------------------------------------------------------

def label_name(x) -> str:
    if x is None:
        return "no label"
    if isinstance(x, float):
        return str(int(x)) if x.is_integer() else f"{x:g}"
    return str(x)


def label_groups(counts: Counter, max_groups: int = 12) -> tuple:
    """(ordered group names, function raw label -> group name) for the difficulty mix: numbers as themselves,
    or in 8 equal-width bins where there are more than max_groups distinct ones; strings as themselves, the
    rarest pooled as "other labels" beyond max_groups; None as "no label"."""
    nums = sorted(x for x in counts if isinstance(x, float))
    strs = sorted((x for x in counts if isinstance(x, str)), key=lambda x: (-counts[x], x))
    if len(nums) > max_groups:
        lo, hi = nums[0], nums[-1]
        edges = np.linspace(lo, hi, 9)
        names = [f"{edges[i]:.3g}–{edges[i + 1]:.3g}" for i in range(8)]
        num_key = lambda x: names[min(int(np.searchsorted(edges, x, side="right")) - 1, 7)]  # noqa: E731
        num_order = [n for n in names if any(num_key(x) == n for x in nums)]
    else:
        num_key, num_order = label_name, [label_name(x) for x in nums]
    room = max(max_groups - len(num_order), 1)
    kept = set(strs if len(strs) <= room else strs[: room - 1])
    str_order = sorted(kept) + (["other labels"] if len(kept) < len(strs) else [])

    def key(x):
        if x is None:
            return "no label"
        if isinstance(x, float):
            return num_key(x)
        return x if x in kept else "other labels"
    return num_order + str_order + (["no label"] if None in counts else []), key


def _share_se(k: int, n: int) -> Optional[float]:
    return math.sqrt(k / n * (1 - k / n) / n) if n else None


def concept_vocab(spec: str, cfg: dict) -> Optional[set]:
    """The known concepts: --concept-vocab FILE (one a line), the toy world's for a toy run (auto), else None."""
    if spec == "none" or (spec == "auto" and cfg.get("model") != "toy"):
        return None
    if spec == "auto":
        import tiny as T
        return {concept_key(c) for pair in T.TOY_RUNGS for c in pair}
    with open(spec, encoding="utf-8", errors="replace") as f:
        return {concept_key(line) for line in f if line.strip()}


def analyse_run(run: str, args) -> dict:
    r = read_run(run, args.sample_per_step, args.seed, progress=not args.quiet, difficulty=args.difficulty,
                 truth=args.truth, n_solutions=args.solutions)
    steps = sorted(r["steps"])
    S = r["steps"]
    per_step = {"step": steps}
    raw_labels = sum((S[st]["difficulty"] for st in steps), Counter())
    labels, group = label_groups(raw_labels)
    for st in steps:
        c = Counter()
        for x, k in S[st]["difficulty"].items():
            c[group(x)] += k
        S[st]["difficulty"] = c
        for key in ("label_ok_by", "label_n_by"):
            c = Counter()
            for x, k in S[st][key].items():
                c[group(x)] += k
            S[st][key] = c
    vocab = concept_vocab(args.concept_vocab, r["config"])
    kinds = classify_concepts(r["concept_count"], vocab)
    cum, seen = [], set()
    by_step_first = Counter(r["first_seen"].values())
    for st in steps:
        seen |= S[st]["concepts"]
        cum.append(len(seen))
    cum_kind = {k: [] for k in ("vocabulary", "other", "malformed")}
    seen_kind = Counter()
    firsts = defaultdict(list)
    for c, st in r["first_seen"].items():
        firsts[st].append(c)
    for st in steps:
        for c in firsts.get(st, []):
            seen_kind[kinds[c]["kind"]] += 1
        for k in cum_kind:
            cum_kind[k].append(seen_kind[k])
    per_step.update({
        "problems": [S[st]["rows"] for st in steps],
        "legal_rate": [S[st]["legal"] / S[st]["rows"] if S[st]["rows"] else None for st in steps],
        "solve_rate_mean": [_stat(S[st]["solve"])["mean"] for st in steps],
        "solve_rate_std": [_stat(S[st]["solve"])["std"] for st in steps],
        "solve_rate_se": [_stat(S[st]["solve"])["se"] for st in steps],
        "in_band_share": [S[st]["in_band"] / len(S[st]["solve"]) if S[st]["solve"] else None for st in steps],
        "unique_concepts_cum": cum,
        "unique_concepts_cum_by_kind": cum_kind,
        "new_concepts": [by_step_first.get(st, 0) for st in steps],
        "question_words_mean": [_stat(S[st]["q_words"])["mean"] for st in steps],
        "solution_tokens_mean": [r["metrics"].get(st, {}).get("len/student") for st in steps],
        "difficulty_labels": [label_name(x) for x in labels],
        "difficulty_share": [[S[st]["difficulty"][x] / S[st]["legal"] if S[st]["legal"] else None for x in labels]
                             for st in steps],
        "difficulty_mean": [_stat(S[st]["diff_values"])["mean"] for st in steps],
        "difficulty_se": [_stat(S[st]["diff_values"])["se"] for st in steps],
        "label_accuracy": [S[st]["label_ok"] / S[st]["label_n"] if S[st]["label_n"] else None for st in steps],
        "label_accuracy_n": [S[st]["label_n"] for st in steps],
    })
    stages = []
    for a, b in stage_bounds(steps, args.stages):
        in_st = [st for st in steps if a <= st <= b]
        solve = [x for st in in_st for x in S[st]["solve"]]
        rows = sum(S[st]["rows"] for st in in_st)
        legal = sum(S[st]["legal"] for st in in_st)
        sample = [it for st in in_st for it in S[st]["sample"]]
        sol_tok = [r["metrics"][st]["len/student"] for st in in_st if "len/student" in r["metrics"].get(st, {})]
        dcount = sum((S[st]["difficulty"] for st in in_st), Counter())
        lab_ok, lab_n = sum(S[st]["label_ok"] for st in in_st), sum(S[st]["label_n"] for st in in_st)
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
            "difficulty": _stat([x for st in in_st for x in S[st]["diff_values"]]),
            "difficulty_share": {label_name(x): (dcount[x] / legal if legal else None) for x in labels},
            "label_accuracy": {"n": lab_n, "mean": lab_ok / lab_n if lab_n else None, "se": _share_se(lab_ok, lab_n)},
            "label_accuracy_by_difficulty": _acc_by(in_st, S, labels),
            "_sample": sample,
        })
    for s in stages:
        s["concepts_by_kind"] = dict(Counter(kinds[c]["kind"] for c in s["concepts"]))
    # similarity between stages, on each stage's sample (bounded by --similarity-sample)
    rng = random.Random(args.seed)
    texts = [[it["problem"] for it in rng.sample(s["_sample"], min(args.similarity_sample, len(s["_sample"])))]
             for s in stages]
    k = len(stages)
    overlap = [[jaccard(set(stages[i]["concepts"]), set(stages[j]["concepts"])) for j in range(k)] for i in range(k)]
    rouge = [[mean_rouge_l(texts[i], texts[j], i == j) for j in range(k)] for i in range(k)]
    # examples: per stage, problems spread over the solve-rate range
    for s in stages:
        ok = sorted([it for it in s["_sample"] if it["n_parsed"] and it["solve_rate"] is not None],
                    key=lambda it: it["solve_rate"])
        pick = [ok[int(round(q * (len(ok) - 1)))] for q in np.linspace(0, 1, min(args.examples, len(ok)))] if ok else []
        s["examples"] = [{k2: it[k2] for k2 in ("step", "problem", "solve_rate", "majority", "concepts", "difficulty",
                                                "truth", "label_correct")}
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
        fz_items = [items[: args.frozen_problems] for items in map_items]
        mnt = args.frozen_max_new_tokens or r["config"].get("student_max_new_tokens", 512)
        mnt = mnt if _is_int(mnt) and mnt > 0 else 512
        rates = frozen_solve_rates(model, tok, [[it["problem"] for it in items] for items in fz_items],
                                   args.frozen_samples, mnt, r["config"], args.seed, not args.quiet)
        xs, ys, all_ok = [], [], []
        from checker import normalize_answer
        for i, (s, items, rs) in enumerate(zip(stages, fz_items, rates)):
            s["frozen_solve_rate"] = _stat([x for x, _ in rs])
            xs += [i] * len(rs)
            ys += [x for x, _ in rs]
            ok = [normalize_answer(str(m)) == normalize_answer(it["truth"]) for it, (_, m) in zip(items, rs)
                  if it["truth"] is not None and m is not None]
            all_ok += ok
            s["frozen_label_accuracy"] = {"n": len(ok), "mean": float(np.mean(ok)) if ok else None,
                                          "se": _share_se(sum(ok), len(ok))}
        frozen = {"model": args.frozen_model, "samples": args.frozen_samples, "max_new_tokens": mnt,
                  "problems_per_stage": args.frozen_problems, "trend_per_stage": trend(xs, ys),
                  "solve_rate": _stat(ys),
                  "label_accuracy": {"n": len(all_ok), "mean": float(np.mean(all_ok)) if all_ok else None,
                                     "se": _share_se(sum(all_ok), len(all_ok))}}
    map_texts = [it["problem"] for items in map_items for it in items]
    map_stage = [i for i, items in enumerate(map_items) for _ in items]
    map_diff = [group(it["difficulty"]) if diff_set(labels) else None for items in map_items for it in items]
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
    metric_keys = sorted({k2 for m in r["metrics"].values() for k2 in m if k2 != "step"})
    n_legal = sum(S[st]["legal"] for st in steps)
    all_labels = sum((S[st]["difficulty"] for st in steps), Counter())
    lab_ok, lab_n = sum(S[st]["label_ok"] for st in steps), sum(S[st]["label_n"] for st in steps)
    return {
        "run": run, "label": os.path.basename(os.path.abspath(run)), "band": r["band"],
        "config": {k2: r["config"].get(k2) for k2 in ("model", "recipe", "seed", "steps", "lr", "w_div", "w_len",
                                                      "band_lo", "band_hi", "student_group", "rounds_per_step")
                   if k2 in r["config"]},
        "skipped_lines": r["skipped"], "label_errors": r["label_errors"], "per_step": per_step, "stages": stages,
        "difficulty": {"by": r["difficulty_desc"], "labels": [label_name(x) for x in labels],
                       "numeric": any(isinstance(x, float) for x in raw_labels),
                       "share": {label_name(x): all_labels[x] / n_legal if n_legal else None for x in labels}},
        "truth": {"by": r["truth_desc"], "label_accuracy": {"n": lab_n, "mean": lab_ok / lab_n if lab_n else None,
                                                            "se": _share_se(lab_ok, lab_n)},
                  "by_difficulty": _acc_by(steps, S, labels)},
        "summary": {
            "steps": len(steps), "problems": sum(S[st]["rows"] for st in steps),
            "legal_rate": (n_legal / max(sum(S[st]["rows"] for st in steps), 1)),
            "solve_rate": _stat([x for st in steps for x in S[st]["solve"]]),
            "in_band_share": (sum(S[st]["in_band"] for st in steps) / max(sum(len(S[st]["solve"]) for st in steps), 1)),
            "unique_concepts": len(r["first_seen"]),
            "concepts_by_kind": dict(Counter(v["kind"] for v in kinds.values())),
        },
        "concepts_first_seen": [{"concept": c, "step": st, "count": r["concept_count"][c], "kind": kinds[c]["kind"],
                                 "why": kinds[c]["why"]} for c, st in first],
        "concept_vocabulary": "given" if vocab is not None else None,
        "concept_overlap": overlap, "rouge_l": rouge, "similarity_sample": args.similarity_sample,
        "frozen": frozen,
        "map": {"method": method, "explained_variance": share,
                "points": [[float(x), float(y), int(si)] for (x, y), si in zip(coords, map_stage)],
                "difficulty": map_diff},
        "metrics": {"keys": metric_keys, "step": sorted(r["metrics"]),
                    "values": {k2: [r["metrics"][st].get(k2) for st in sorted(r["metrics"])] for k2 in metric_keys}},
        "solutions": {"file": r["solutions_file"], "problems": r["solutions_total"],
                      "shown": [{"step": x["step"], "round": x.get("round"), "problem": x["problem"],
                                 "majority": x.get("majority"), "truth": x.get("_truth"),
                                 "answers": x.get("answers") or [], "solutions": x["solutions"]}
                                for x in r["solutions"]]},
    }


def _acc_by(steps: list, S: dict, labels: list) -> dict:
    """Label accuracy (n, mean, SE) per difficulty group over the given steps; groups with no known truth left out."""
    out = {}
    for x in labels:
        ok, n = sum(S[st]["label_ok_by"][x] for st in steps), sum(S[st]["label_n_by"][x] for st in steps)
        if n:
            out[x] = {"n": n, "mean": ok / n, "se": _share_se(ok, n)}
    return out


def diff_set(labels: list) -> bool:
    """Whether a run has difficulty labels at all (not only "no label")."""
    return any(x != "no label" for x in labels)


# --- figures and the page -----------------------------------------------------------------------------

def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _tex(s) -> str:
    """A string for a matplotlib label: `$` would start mathtext (and an odd count raises), so escape it."""
    s = str(s).replace("$", r"\$")
    return " " + s if s.startswith("_") else s  # a leading "_" would hide the legend entry


DIFF_CMAP = "turbo"  # ordered and well apart: blue (easy) through green to red (hard)


def _diff_colour(cmap, j: int, n: int):
    """The colour of the j-th of n difficulty labels, "no label" not counted (the caller draws it grey)."""
    return cmap(0.1 + 0.8 * j / max(n - 1, 1))


def _legend(ax, **kw) -> None:
    """A legend where something is labelled (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, **kw)


def _stage_axis(ax, runs: list) -> None:
    """Integer ticks, one per stage, labelled with the stage's steps where every run has the same stages."""
    k = max(len(r["stages"]) for r in runs)
    same = all([s["steps"] for s in r["stages"]] == [s["steps"] for s in runs[0]["stages"]] for r in runs)
    ax.set_xticks(range(k))
    ax.set_xticklabels([f"{i}\n{s['steps'][0]}-{s['steps'][1]}" for i, s in enumerate(runs[0]["stages"])]
                       if same else [str(i) for i in range(k)], fontsize=7)
    ax.set_xlabel("stage (steps)" if same else "stage (the runs' own spans of steps)")
    ax.set_xlim(-0.5, k - 0.5)


def _annotated_heatmap(fig, ax, mat: np.ndarray, names: list, title: str) -> None:
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            if np.isfinite(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if mat[i, j] > 0.7 else "white")
    ax.set_xticks(range(len(names)))
    ax.set_yticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=7, rotation=30, ha="right")
    ax.set_yticklabels(names, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)


def make_figures(runs: list, out: str, args=None) -> dict:
    """PNG files under out (through safe_write); returns {name: base64 png}. Empty without matplotlib."""
    plt = _plt()
    if plt is None:
        return {}
    sm = getattr(args, "smooth", 1) or 1
    figs = {}

    from matplotlib.ticker import MaxNLocator

    def save(fig, name):
        for ax in fig.axes:  # steps are whole numbers
            if ax.get_xlabel() == "step":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        safe_write(out, f"fig_{name}.png", buf.getvalue())
        figs[name] = base64.b64encode(buf.getvalue()).decode()

    def nz(xs):
        return np.array([np.nan if x is None else x for x in xs], float)

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    col = {i: colors[i % len(colors)] for i in range(len(runs))}
    sm_note = f"\n(moving average of {sm} steps)" if sm > 1 else ""

    # training curves from metrics.jsonl, every run overlaid
    keys = [k for k in (getattr(args, "curves", None) or DEFAULT_CURVES) if any(k in r["metrics"]["keys"] for r in runs)]
    missing = [k for k in (getattr(args, "curves", None) or []) if k not in keys]
    if missing:
        print(f"warning: --curves {' '.join(missing)}: in no run's metrics.jsonl (as numbers); not drawn", file=sys.stderr)
    if keys:
        ncol = min(4, len(keys))
        nrow = math.ceil(len(keys) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False)
        for ax, k in zip(axes.flat, keys):
            for i, r in enumerate(runs):
                if k in r["metrics"]["keys"]:
                    ax.plot(r["metrics"]["step"], nz(smooth(r["metrics"]["values"][k], sm)), color=col[i],
                            label=_tex(r["label"]), lw=1.2)
            ax.set_title(_tex(k), fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        _legend(axes.flat[0])
        fig.suptitle("training curves (metrics.jsonl)" + sm_note.replace("\n", " "), fontsize=10)
        save(fig, "curves")

    # solve rate (mean ± SE) with the frozen model as the step-0 reference, and the in-band share
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, r in enumerate(runs):
        ps = r["per_step"]
        m, se = nz(smooth(ps["solve_rate_mean"], sm)), nz(ps["solve_rate_se"])
        axes[0].plot(ps["step"], m, label=_tex(r["label"]), color=col[i])
        axes[0].fill_between(ps["step"], m - se, m + se, alpha=0.2, color=col[i])
        if r["frozen"] and r["frozen"]["solve_rate"]["mean"] is not None:
            axes[0].axhline(r["frozen"]["solve_rate"]["mean"], color=col[i], ls="--", lw=1,
                            label=_tex(f"{r['label']}: frozen model (step 0)"))
        lo, hi = r["band"]
        axes[1].plot(ps["step"], nz(smooth(ps["in_band_share"], sm)), label=_tex(r["label"]), color=col[i])
    for ax, t in zip(axes, ["student solve rate (mean ± SE over problems)", "in-band share"]):
        ax.set_title(t + sm_note, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        _legend(ax)
    save(fig, "solve_rate")

    # difficulty: mix over time per run, and the mean per stage (± SE) with the runs overlaid
    with_diff = [(i, r) for i, r in enumerate(runs) if any(x != "no label" for x in r["difficulty"]["labels"])]
    if with_diff:
        n = len(with_diff) + 1
        fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 3.8), squeeze=False)
        for ax, (i, r) in zip(axes[0], with_diff):
            ps = r["per_step"]
            names = ps["difficulty_labels"]
            share = np.array([[0.0 if v is None else v for v in row] for row in ps["difficulty_share"]],
                             float).reshape(len(ps["step"]), len(names))
            share = np.array([smooth(share[:, j].tolist(), sm) for j in range(len(names))], float)
            cmap = plt.get_cmap(DIFF_CMAP)
            names = ps["difficulty_labels"]
            lab_cols = [("lightgrey" if nm == "no label" else _diff_colour(cmap, j, sum(x != "no label" for x in names)))
                        for j, nm in enumerate(names)]
            ax.stackplot(ps["step"], share, labels=[_tex(nm) for nm in names], colors=lab_cols, alpha=0.9)
            ax.set_ylim(0, 1)
            ax.set_xlabel("step")
            ax.set_title(_tex(f"{r['label']}: difficulty mix of legal problems") + sm_note, fontsize=9)
            hs, ls = ax.get_legend_handles_labels()  # top of the legend = top of the stack
            ax.legend(hs[::-1], ls[::-1], fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="label",
                      title_fontsize=7)
        ax = axes[0][-1]
        drawn = False
        for i, r in with_diff:
            if not r["difficulty"]["numeric"]:
                continue
            st = [s["difficulty"] for s in r["stages"]]
            xs = [j for j, d in enumerate(st) if d["mean"] is not None]
            off = (with_diff.index((i, r)) - (len(with_diff) - 1) / 2) * 0.06
            ax.errorbar([x + off for x in xs], [st[j]["mean"] for j in xs], [st[j]["se"] or 0 for j in xs],
                        marker="o", capsize=3, color=col[i], label=_tex(r["label"]))
            drawn = True
        _stage_axis(ax, [r for _, r in with_diff])
        ax.set_title("mean difficulty per stage (± SE)", fontsize=9)
        if drawn:
            _legend(ax)
        else:
            ax.text(0.5, 0.5, "labels are not numbers", ha="center", transform=ax.transAxes)
        save(fig, "difficulty")

    # label accuracy over time, where a truth function is given
    with_truth = [(i, r) for i, r in enumerate(runs) if r["truth"]["label_accuracy"]["n"]]
    if with_truth:
        groups = []
        for _, r in with_truth:
            groups += [x for x in r["truth"]["by_difficulty"] if x not in groups]
        fig, axes = plt.subplots(1, 2 if groups else 1, figsize=(11 if groups else 6.5, 3.8), squeeze=False)
        ax = axes[0][0]
        for i, r in with_truth:
            ps = r["per_step"]
            acc, n = nz(smooth(ps["label_accuracy"], sm)), np.array(ps["label_accuracy_n"], float)
            se = np.sqrt(np.clip(acc * (1 - acc), 0, None) / np.maximum(n * sm, 1))
            ax.plot(ps["step"], acc, color=col[i], label=_tex(r["label"]))
            ax.fill_between(ps["step"], acc - se, acc + se, color=col[i], alpha=0.2)
            fa = (r["frozen"] or {}).get("label_accuracy", {})
            if fa.get("mean") is not None:
                ax.axhline(fa["mean"], color=col[i], ls="--", lw=1, label=_tex(f"{r['label']}: frozen model (step 0)"))
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_title("accuracy of the majority label against the truth (± SE)" + sm_note, fontsize=9)
        _legend(ax)
        if groups:
            ax = axes[0][1]
            for k, (i, r) in enumerate(with_truth):
                by = r["truth"]["by_difficulty"]
                xs = [j for j, x in enumerate(groups) if x in by]
                off = (k - (len(with_truth) - 1) / 2) * 0.08
                ax.errorbar([x + off for x in xs], [by[groups[j]]["mean"] for j in xs],
                            [by[groups[j]]["se"] or 0 for j in xs], marker="o", capsize=3, ls="none", color=col[i],
                            label=_tex(r["label"]))
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([_tex(g) for g in groups], fontsize=8)
            ax.set_xlabel("difficulty")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title("label accuracy by difficulty, whole run (± SE)", fontsize=9)
            _legend(ax)
        save(fig, "label_accuracy")

    if any(s.get("frozen_solve_rate") for r in runs for s in r["stages"]):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for i, r in enumerate(runs):
            st = r["stages"]
            xs = [j for j, s in enumerate(st) if s.get("frozen_solve_rate", {}).get("mean") is not None]
            if not xs:
                continue
            off = (i - (len(runs) - 1) / 2) * 0.06
            ax.errorbar([x + off for x in xs], [st[j]["frozen_solve_rate"]["mean"] for j in xs],
                        [st[j]["frozen_solve_rate"]["se"] or 0 for j in xs], marker="o", capsize=3, color=col[i],
                        label=_tex(r["label"]))
            t = r["frozen"]["trend_per_stage"]
            if t:
                mean = r["frozen"]["solve_rate"]["mean"]
                xx = np.array([xs[0], xs[-1]], float)
                xbar = np.mean([j for j in xs for _ in range(st[j]["frozen_solve_rate"]["n"])])
                ax.plot(xx, mean + t["slope"] * (xx - xbar), ls=":", color=col[i],
                        label=_tex(f"{r['label']}: trend {t['slope']:+.3f} ± {t['se']:.3f} / stage"))
        _stage_axis(ax, runs)
        ax.set_title("frozen initial model: solve rate by stage (± SE)", fontsize=10)
        _legend(ax)
        save(fig, "frozen")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, r in enumerate(runs):
        ps = r["per_step"]
        axes[0].plot(ps["step"], nz(smooth(ps["legal_rate"], sm)), color=col[i], label=_tex(r["label"]))
        for kind, ls in (("vocabulary", "-."), ("other", "-"), ("malformed", ":")):
            ys = ps["unique_concepts_cum_by_kind"][kind]
            if any(ys):
                axes[1].plot(ps["step"], ys, ls=ls, color=col[i], label=_tex(f"{r['label']}: {kind}"))
    axes[0].set_title("legal rate of teacher outputs" + sm_note, fontsize=10)
    axes[1].set_title("distinct concept strings so far, by kind", fontsize=10)
    axes[1].yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.set_xlabel("step")
        _legend(ax)
    save(fig, "legal_concepts")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (key, title) in zip(axes, [("question_words_mean", "question length (words)"),
                                       ("solution_tokens_mean", "student solution length (tokens, metrics.jsonl)")]):
        for i, r in enumerate(runs):
            ax.plot(r["per_step"]["step"], nz(smooth(r["per_step"][key], sm)), color=col[i], label=_tex(r["label"]))
        ax.set_title(title + sm_note, fontsize=10)
        ax.set_xlabel("step")
        _legend(ax)
    save(fig, "lengths")

    for i, r in enumerate(runs):
        if not r["stages"]:  # no usable line: nothing to compare or map
            continue
        names = [f"{j}: {s['steps'][0]}-{s['steps'][1]}" for j, s in enumerate(r["stages"])]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.0))
        for ax, key, t in zip(axes, ["concept_overlap", "rouge_l"], ["concept overlap (Jaccard)", "ROUGE-L F1"]):
            mat = np.array([[np.nan if v is None else v for v in row] for row in r[key]], float).reshape(len(names), -1)
            _annotated_heatmap(fig, ax, mat, names, _tex(f"{r['label']}: {t} between stages"))
        save(fig, f"overlap_{i}")
        pts = np.array(r["map"]["points"], float).reshape(-1, 3)
        diffs = r["map"]["difficulty"]
        has_d = any(d is not None and d != "no label" for d in diffs)
        fig, axes = plt.subplots(1, 2 if has_d else 1, figsize=(11 if has_d else 5.5, 4.2), squeeze=False)
        ax = axes[0][0]
        cmap = plt.get_cmap("viridis")
        for si, s in enumerate(r["stages"]):
            sel = pts[:, 2] == si
            ax.scatter(pts[sel, 0], pts[sel, 1], s=10, alpha=0.6, label=s["name"],
                       color=cmap(si / max(len(r["stages"]) - 1, 1)))
        ax.set_title(_tex(f"{r['label']}: problems by stage (PCA)"), fontsize=9)
        _legend(ax)
        if has_d:
            ax = axes[0][1]
            order = r["difficulty"]["labels"]
            dcmap = plt.get_cmap(DIFF_CMAP)
            for j, nm in enumerate(order):
                sel = np.array([d == nm for d in diffs], bool)
                if sel.any():
                    ax.scatter(pts[sel, 0], pts[sel, 1], s=10, alpha=0.7, label=_tex(nm),
                               color="lightgrey" if nm == "no label" else _diff_colour(dcmap, j, sum(x != "no label" for x in order)))
            ax.set_title(_tex(f"{r['label']}: problems by difficulty (PCA)"), fontsize=9)
            _legend(ax, title="difficulty", title_fontsize=7)
        save(fig, f"map_{i}")
    return figs


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return _e(v)


def _pm(d: Optional[dict], digits=3) -> str:
    """'mean ± se' of a _stat-like dict, escaped-safe (numbers only)."""
    if not d or d.get("mean") is None:
        return "–"
    return f"{d['mean']:.{digits}f}" + (f" ± {d['se']:.{digits}f}" if d.get("se") is not None else "")


def _table(head: list, rows: list) -> str:
    return ("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")


def _img(figs: dict, name: str) -> str:
    return f'<img src="data:image/png;base64,{figs[name]}" alt="{_e(name)}">' if name in figs else ""


def _pre(text: str, limit: int) -> str:
    t = text if len(text) <= limit else text[:limit] + f" … ({len(text) - limit} more characters)"
    return f"<pre>{_e(t)}</pre>"


def write_html(runs: list, figs: dict, out: str, note: str, args=None) -> None:
    """report.html: every string that comes from a run or from the command line goes through html.escape."""
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>OpenSIR curriculum report</title><style>"
         "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse;"
         "margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}"
         "pre{white-space:pre-wrap;background:#f6f6f6;padding:4px;font-size:12px;margin:2px 0}"
         "</style></head><body><h1>OpenSIR curriculum report</h1>",
         f"<p>Runs: {', '.join(_e(r['run']) for r in runs)}. {_e(note)}</p>"]

    def sec(sid, title):
        h.append(f'<h2 id="{sid}">{_e(title)}</h2>')

    h.append("<p>" + " · ".join(f'<a href="#{sid}">{_e(sid)}</a>' for sid in SECTIONS) + "</p>")
    h.append("<p>At a glance, first stage → last stage (± SE):</p>" + _table(
        ["run", "steps", "student solve rate", "mean difficulty", "label accuracy", "frozen model's solve rate",
         "malformed concept strings"],
        [[r["label"], r["summary"]["steps"]]
         + [f"{_pm(r['stages'][0].get(k), 3 if k != 'difficulty' else 2)} → "
            f"{_pm(r['stages'][-1].get(k), 3 if k != 'difficulty' else 2)}" if r["stages"] else None
            for k in ("solve_rate", "difficulty", "label_accuracy", "frozen_solve_rate")]
         + [f"{r['summary']['concepts_by_kind'].get('malformed', 0)} of {r['summary']['unique_concepts']}"]
         for r in runs]))

    sec("curves", "Training curves (metrics.jsonl), runs overlaid")
    h.append(_img(figs, "curves") or "<p>No metrics.jsonl values to plot.</p>")
    sec("solve-rate", "Student solve rate and in-band share")
    h.append(_img(figs, "solve_rate"))
    for r in runs:
        h.append(f"<h3>{_e(r['label'])}</h3>" + _table(
            ["stage", "legal problems", "solve rate mean ± SE", "sd", "in-band share"],
            [[s["name"], s["solve_rate"]["n"], _pm(s["solve_rate"]), s["solve_rate"]["std"], s["in_band_share"]]
             for s in r["stages"]]))
    sec("difficulty", "Difficulty mix over time")
    h.append(_img(figs, "difficulty"))
    for r in runs:
        d = r["difficulty"]
        if not d["by"]:
            h.append(f"<p>{_e(r['label'])}: no difficulty labels (pass --difficulty toy, field:NAME or "
                     "MODULE:FUNC).</p>")
            continue
        h.append(f"<h3>{_e(r['label'])}</h3><p>Difficulty: {_e(d['by'])}; shares of legal problems.</p>" + _table(
            ["stage", "legal", "mean difficulty ± SE"] + d["labels"],
            [[s["name"], s["legal"], _pm(s["difficulty"], 2)] + [s["difficulty_share"].get(x) for x in d["labels"]]
             for s in r["stages"]]))
    sec("labels", "Accuracy of the majority label")
    h.append(_img(figs, "label_accuracy"))
    for r in runs:
        t = r["truth"]
        if not t["by"]:
            h.append(f"<p>{_e(r['label'])}: no truth function (pass --truth toy or MODULE:FUNC).</p>")
            continue
        h.append(f"<h3>{_e(r['label'])}</h3><p>Truth: {_e(t['by'])}; overall {_pm(t['label_accuracy'])} over "
                 f"{t['label_accuracy']['n']} problems with a known truth and a majority.</p>" + _table(
                     ["stage", "problems", "label accuracy ± SE", "frozen model's label accuracy ± SE"],
                     [[s["name"], s["label_accuracy"]["n"], _pm(s["label_accuracy"]),
                       _pm(s.get("frozen_label_accuracy"))] for s in r["stages"]]))
        by = t["by_difficulty"]
        if by:
            h.append("<p>By difficulty (± SE, problems in brackets): where the majority vote fails.</p>" + _table(
                ["stage"] + list(by),
                [[s["name"]] + [f"{_pm(s['label_accuracy_by_difficulty'].get(x))} "
                                f"({s['label_accuracy_by_difficulty'].get(x, {}).get('n', 0)})" for x in by]
                 for s in r["stages"]] + [["all"] + [f"{_pm(by[x])} ({by[x]['n']})" for x in by]]))
    sec("frozen", "Frozen initial model's solve rate on each stage's problems")
    if any(r["frozen"] for r in runs):
        h.append(_img(figs, "frozen"))
        for r in runs:
            if r["frozen"]:
                f = r["frozen"]
                t = f["trend_per_stage"]
                h.append(f"<p>{_e(r['label'])}: {_e(f['model'])}, {_e(f['samples'])} samples per problem, up to "
                         f"{_e(f['problems_per_stage'])} problems per stage, majority-vote solve rate"
                         + (f"; linear trend {t['slope']:+.3f} ± {t['se']:.3f} per stage" if t else "")
                         + ".</p>" + _table(
                             ["stage", "problems", "frozen solve rate ± SE", "sd"],
                             [[s["name"], s["frozen_solve_rate"]["n"], _pm(s["frozen_solve_rate"]),
                               s["frozen_solve_rate"]["std"]] for s in r["stages"]]))
    else:
        h.append("<p>Not measured: pass --frozen-model (e.g. the run's --model) to load the initial model.</p>")
    sec("legal", "Legal rate")
    h.append(_img(figs, "legal_concepts"))
    h.append(_table(["run"] + [f"stage {i}" for i in range(max(len(r["stages"]) for r in runs))],
                    [[r["label"]] + [s["legal_rate"] for s in r["stages"]] for r in runs]))
    sec("concepts", "Concepts explored, well-formed strings apart from malformed ones")
    h.append("<p>A concept string counts as malformed when it has no letters or has markup, is too long, writes "
             "a fragment twice in a row, or is a truncated or near copy of a more frequent concept (a heuristic; "
             "the reason is listed). Where a vocabulary is known (the toy world's, or --concept-vocab), strings in "
             "it count as vocabulary, and whole words cut out of one of its concepts as malformed; every other "
             "well-formed string counts as other (a new topic, or a known one in other words).</p>")
    for r in runs:
        kinds = r["summary"]["concepts_by_kind"]
        h.append(f"<h3>{_e(r['label'])}: {r['summary']['unique_concepts']} distinct concept strings ("
                 + ", ".join(f"{_e(k)} {v}" for k, v in sorted(kinds.items())) + ")</h3>")
        h.append(_table(["stage", "distinct concepts in stage", "vocabulary", "other", "malformed"],
                        [[s["name"], len(s["concepts"])] + [s["concepts_by_kind"].get(k, 0)
                                                            for k in ("vocabulary", "other", "malformed")]
                         for s in r["stages"]]))
        good = [c for c in r["concepts_first_seen"] if c["kind"] != "malformed"]
        bad = [c for c in r["concepts_first_seen"] if c["kind"] == "malformed"]
        h.append("<p>Well-formed concepts, first appearances (first 40, by step):</p>" + _table(
            ["concept", "kind", "first step", "times used"], [[c["concept"], c["kind"], c["step"], c["count"]]
                                                              for c in good[:40]]))
        h.append(f"<p>Malformed strings ({len(bad)}; first 40, by step):</p>" + (_table(
            ["string", "why", "first step", "times used"], [[c["concept"], c["why"], c["step"], c["count"]]
                                                            for c in bad[:40]]) if bad else "<p>None.</p>"))
    sec("overlap", "Concept overlap and ROUGE-L between stages")
    for i, r in enumerate(runs):
        names = [s["name"] for s in r["stages"]]
        h.append(f"<h3>{_e(r['label'])}</h3>" + _img(figs, f"overlap_{i}"))
        h.append("<p>Concept overlap (Jaccard of the stages' concept sets):</p>"
                 + _table([""] + names, [[n] + row for n, row in zip(names, r["concept_overlap"])]))
        h.append(f"<p>Mean ROUGE-L F1 over pairs of problems (up to {_e(r['similarity_sample'])} sampled per stage; "
                 "diagonal: distinct pairs within the stage):</p>"
                 + _table([""] + names, [[n] + row for n, row in zip(names, r["rouge_l"])]))
    sec("lengths", "Question and solution lengths")
    h.append(_img(figs, "lengths"))
    for r in runs:
        h.append(f"<h3>{_e(r['label'])}</h3>" + _table(
            ["stage", "question words", "question chars", "solution tokens (metrics)",
             "solution tokens (from length reward, capped)"],
            [[s["name"], s["question_words"]["mean"], s["question_chars"]["mean"], s["solution_tokens_metrics"],
              s["solution_tokens_capped"]["mean"]] for s in r["stages"]]))
    sec("map", "2-D map of problem embeddings, by stage and by difficulty")
    for i, r in enumerate(runs):
        ev = r["map"]["explained_variance"]
        h.append(f"<h3>{_e(r['label'])}</h3><p>{_e(r['map']['method'])}; "
                 f"{len(r['map']['points'])} problems; PC1 {ev[0]:.1%}, PC2 {ev[1]:.1%} of variance.</p>"
                 + _img(figs, f"map_{i}"))
    sec("examples", "Example problems with their solve rates, per stage")
    for r in runs:
        h.append(f"<h3>{_e(r['label'])}</h3>")
        for s in r["stages"]:
            h.append(f"<h4>{_e(s['name'])}</h4>" + _table(
                ["step", "solve rate", "majority", "truth", "difficulty", "concepts", "problem"],
                [[e["step"], e["solve_rate"], e["majority"], e["truth"],
                  None if e["difficulty"] is None else label_name(e["difficulty"]), ", ".join(e["concepts"]),
                  e["problem"]] for e in s["examples"]]))
    sec("solutions", "Saved student solutions")
    limit = getattr(args, "solution_chars", 800)
    for r in runs:
        so = r["solutions"]
        if not so["file"]:
            h.append(f"<p>{_e(r['label'])}: this run saved no student solutions (no solutions.jsonl.gz).</p>")
            continue
        h.append(f"<h3>{_e(r['label'])}: {len(so['shown'])} of {so['problems']} problems in {_e(so['file'])}, "
                 "chosen at random (seeded)</h3>")
        for x in so["shown"]:
            answers = Counter("(none)" if a is None else str(a) for a in x["answers"])
            h.append(f"<h4>step {_e(x['step'])}, round {_fmt(x['round'])}</h4><p><b>Problem:</b></p>"
                     + _pre(x["problem"], limit)
                     + f"<p><b>Majority:</b> {_fmt(x['majority'])}"
                     + (f"; <b>truth:</b> {_e(x['truth'])}" if x.get("truth") is not None else "")
                     + "; <b>answers:</b> " + _e(", ".join(f"{a} ×{k}" for a, k in answers.most_common())) + "</p>")
            ans = list(x["answers"]) + [None] * max(len(x["solutions"]) - len(x["answers"]), 0)
            same = Counter(zip(x["solutions"], ans))  # identical texts shown once, with their count
            for j, ((sol, a), k) in enumerate(same.most_common(getattr(args, "solutions_per_problem", 3))):
                agree = " (the majority)" if a is not None and x["majority"] is not None \
                    and str(a) == str(x["majority"]) else ""
                h.append(f"<p>distinct solution {j + 1} of {len(same)}: answer {_fmt(a)}{agree}, written {k} of "
                         f"{len(x['solutions'])} times</p>" + _pre(sol, limit))
    sec("compare", "Runs side by side")
    h.append(_table(["run", "steps", "problems", "legal rate", "solve rate", "sd", "in-band share",
                     "label accuracy", "unique concepts", "malformed", "config"],
                    [[r["label"], r["summary"]["steps"], r["summary"]["problems"], r["summary"]["legal_rate"],
                      r["summary"]["solve_rate"]["mean"], r["summary"]["solve_rate"]["std"],
                      r["summary"]["in_band_share"], r["truth"]["label_accuracy"]["mean"],
                      r["summary"]["unique_concepts"], r["summary"]["concepts_by_kind"].get("malformed", 0),
                      json.dumps(r["config"])] for r in runs]))
    sec("skipped", "Skipped lines")
    bad = [[r["label"], b["file"], b["line"], b["error"]] for r in runs for b in r["skipped_lines"]]
    counts = ", ".join(f"{_e(r['label'])}: {len(r['skipped_lines'])}" for r in runs)
    h.append(f"<p>Skipped per run: {counts}." + (" The first 200 below; report.json lists every one."
                                                 if len(bad) > 200 else "") + "</p>"
             + (_table(["run", "file", "line", "why"], bad[:200]) if bad else "<p>None.</p>"))
    h.append("</body></html>")
    safe_write(out, "report.html", "\n".join(h).encode("utf-8"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Curriculum report of one or more opensir.py runs, overlaid.")
    p.add_argument("runs", nargs="+", help="run directories (opensir.py --out)")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN", help="more runs to overlay (the same as "
                   "listing them after the first)")
    p.add_argument("--out", required=True, help="report directory (report.html, report.json, fig_*.png)")
    p.add_argument("--stages", type=int, default=4, help="number of equal spans of steps compared")
    p.add_argument("--difficulty", default="auto", help="difficulty label of a problem: auto (toy rung for "
                   "--model toy runs), none, toy, field:NAME (a problems.jsonl field) or MODULE:FUNC (of the text)")
    p.add_argument("--truth", default="auto", help="true answer of a problem, for label accuracy: auto (toy "
                   "world for --model toy runs), none, toy or MODULE:FUNC (of the text; None where unknown)")
    p.add_argument("--concept-vocab", default="auto", help="file of known concepts, one a line; auto: the toy "
                   "world's for toy runs; none")
    p.add_argument("--curves", nargs="+", default=None, metavar="KEY",
                   help=f"metrics.jsonl keys overlaid as training curves (default: {' '.join(DEFAULT_CURVES)})")
    p.add_argument("--smooth", type=int, default=1, help="moving average over this many steps in per-step plots")
    p.add_argument("--solutions", type=int, default=3, help="saved student solutions shown per run (0: none)")
    p.add_argument("--solutions-per-problem", type=int, default=3, help="solutions shown of each such problem")
    p.add_argument("--solution-chars", type=int, default=800, help="characters shown of each text")
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
    args.runs = list(args.runs) + list(args.compare)
    for name in ("stages", "sample_per_step", "similarity_sample", "map_per_stage", "frozen_problems",
                 "frozen_samples", "smooth", "solutions_per_problem", "solution_chars"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.solutions < 0 or args.frozen_max_new_tokens < 0:
        raise SystemExit("--solutions and --frozen-max-new-tokens must be >= 0")
    for run in args.runs:
        if not os.path.exists(os.path.join(run, "problems.jsonl")):
            raise SystemExit(f"{run}: no problems.jsonl (is it the --out directory of an opensir.py run?)")
    check_label_spec(args.difficulty, "--difficulty", fields=True)
    check_label_spec(args.truth, "--truth", fields=False)
    if args.concept_vocab not in ("auto", "none") and not os.path.isfile(args.concept_vocab):
        raise SystemExit(f"--concept-vocab {args.concept_vocab}: no such file")
    if args.frozen_model:
        import models
        if models.model_name_error(args.frozen_model):
            raise SystemExit(models.model_name_error(args.frozen_model))
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"--out {args.out}: exists and is not a directory (a file, or a link to nothing)")
    os.makedirs(args.out, exist_ok=True)
    for name in ("report.html", "report.json"):  # refuse a planted link before the long part, not after
        p = os.path.join(args.out, name)
        if os.path.lexists(p) and not stat.S_ISREG(os.lstat(p).st_mode):
            raise SystemExit(f"{p} is a symbolic link or not a plain file: analyze.py never writes through it; "
                             "remove it or choose another --out")
    runs = [analyse_run(run, args) for run in args.runs]
    labels = Counter(r["label"] for r in runs)
    for i, r in enumerate(runs):  # two runs of one name (seed1 of two ablations) get their parent folder too
        if labels[r["label"]] > 1:
            r["label"] = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(r["run"]))), r["label"]) \
                + f" #{i + 1}"
    figs = make_figures(runs, args.out, args)
    note = ("" if figs or _plt() is not None else
            "matplotlib is not installed, so this report has tables only (pip install -r requirements-plots.txt).")
    write_html(runs, figs, args.out, note, args)
    report = {"runs": runs, "figures": sorted(f"fig_{k}.png" for k in figs)}
    safe_write(args.out, "report.json", json.dumps(report, indent=1, default=str).encode("utf-8"))
    print(f"wrote {args.out}/report.html, report.json and {len(figs)} figures")
    return report


if __name__ == "__main__":
    main()
