"""Evaluate a model on the maths benchmarks of the OpenSIR paper.

    python eval.py --model gemma-2-2b-it                   # the first version's five, the paper's settings
    python eval.py --model gemma-2-2b-it --benchmarks paper  # the later version's seven (adds AIME 2024, 2025)
    python eval.py --model runs/opensir --benchmarks gsm8k --limit 50
    python eval.py --compare eval_results/a eval_results/b eval_results/c   # any number of runs
    python eval.py --model runs/opensir --all-checkpoints --out eval_results/opensir  # every checkpoint

The paper's protocol: the student prompt of opensir.py, 16 samples per problem at temperature 0.6,
top-p 0.95, up to 4096 new tokens; a benchmark's score is the mean accuracy over all samples x 100
(an estimate of pass@1), reported with its standard error, and the headline is the unweighted mean
over benchmarks. The paper's first version (v1, the authors' released code: `--recipe code`) averages
five benchmarks; its later text (v3/v4: `--recipe paper`) seven, adding AIME 2024 and 2025, and gives
reasoning models (DeepSeek-R1-Distill, Qwen3) up to 38,912 new tokens (`--max-new-tokens 38912`).
Prompt, answer extraction and the answer checker are imported from opensir.py, so what training
rewards and what evaluation counts cannot drift apart.

Data: `--data-dir/NAME.jsonl` in the layout of the public copies, else a cached download.
Output in --out: samples.jsonl (one line per sample; `--resume` continues it), summary.json.

Reproducible resume: every sample is seeded from (--seed, benchmark, problem id, sample index) alone
(sample_seed), and the generate engine draws each sample from its own stream, so a resumed eval equals an
uninterrupted one sample for sample, whatever --batch-size or the number of torchrun ranks. Samples are
generated in chunks of --batch-size built from the sample keys alone (each benchmark's samples in order,
problem then sample index); a partly written chunk is regenerated whole and only its missing samples are
written, which keeps the continuous engine (one seed per call) reproducible too, with the same
--batch-size. Growing --n or --limit on resume adds samples; those are what an uninterrupted eval with
the new values gives.

Files in --out are never written through a symbolic link: one planted there is refused (O_NOFOLLOW).
Ctrl-C keeps every sample written and prints the command that continues.

--compare RUN ...: each benchmark's score per run, then each run's difference from the first with its
standard error: paired by problem where both runs scored the same problems (summary.json keeps each
problem's accuracy and a fingerprint of the problem set), unpaired otherwise; the table says which.
--all-checkpoints: --model RUN_DIR's every complete checkpoint into OUT/ckpt-NNNNN, then one table (step x
benchmark, also OUT/checkpoints.json); with --resume it continues, keeping checkpoints already done.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import sys
import urllib.request
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import checker
import engines
import models
import opensir
import parallel
import runs

# ================================================================================================
# Benchmarks: where the problem and the gold answer live in each public copy
# ================================================================================================

QWEN = "https://raw.githubusercontent.com/QwenLM/Qwen2.5-Math/main/evaluation/data"


@dataclass(frozen=True)
class Benchmark:
    name: str
    problem_field: str
    gold_field: str
    gold: Callable[[dict], Optional[str]]  # row -> gold answer string
    url: str  # public source, fetched once into the cache when no local copy exists


def as_text(value) -> Optional[str]:
    """A gold answer (or problem) as the string the checker compares, whatever JSON type a copy stores it
    as: a string as it is (if not blank); a number written plainly (70000.0 -> "70000"); a list of such parts joined with
    ", " (several parts form one answer: a set). None, an empty string or list, a bool, an object, NaN or
    infinity give None: that row has no usable value and is skipped (and counted), never scored 0."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list):
        parts = [as_text(v) for v in value]
        return ", ".join(parts) if parts and all(p is not None for p in parts) else None
    return None


def _stripped(value) -> Optional[str]:
    text = as_text(value)
    return text.strip() if text else None


def _gsm8k_gold(row: dict) -> Optional[str]:
    """The solution text ends in `#### 70,000`; the number is the answer (a bare number is taken as is)."""
    answer = row["answer"]
    if not isinstance(answer, str):
        return as_text(answer)
    tail = answer.rsplit("####", 1)
    return as_text(tail[1].strip().replace(",", "")) if len(tail) == 2 else None


def _boxed_gold(row: dict) -> Optional[str]:
    """Minerva: the last \\boxed{} of the solution text."""
    solution = row["solution"]
    return as_text(checker.extract_boxed(solution, last=True)) if isinstance(solution, str) else None


_NAMES_PARTS = re.compile(r"\$[^$]{1,60}\$\s*,?\s*and\s+\$[^$]{1,60}\$|minimum and maximum|smallest and largest|"
                          r"largest and smallest|how many of each", re.I)
_ASKS_A_SET = re.compile(r"(?<!for )\ball\b|\bsolutions?\b|\btwo possible\b|\bwhich satisfy\b|\bfor which\b|\banother\b|\bother\b|\bpossible values\b", re.I)


def _olympiad_gold(row: dict) -> Optional[str]:
    """`final_answer` is a list of LaTeX strings. Several parts (or one with commas) are a set of
    answers, unless the question names the parts it asks for (`determine $b$ and $c$`, `the minimum
    and maximum`) and asks for no set of solutions: then they are ordered, and the gold is written
    checker.ordered_parts, which the checker compares part by part, in order."""
    parts, question = row["final_answer"], row.get("question")
    question = question if isinstance(question, str) else ""
    if (isinstance(parts, list) and parts and all(isinstance(p, str) for p in parts)
            and row.get("is_multiple_answer") and _NAMES_PARTS.search(question) and not _ASKS_A_SET.search(question)):
        return checker.ordered_parts(parts)
    return as_text(parts)


BENCHMARKS = {b.name: b for b in [
    Benchmark("gsm8k", "question", "answer", _gsm8k_gold, f"{QWEN}/gsm8k/test.jsonl"),
    Benchmark("math500", "problem", "answer", lambda r: as_text(r["answer"]),
              "https://huggingface.co/datasets/HuggingFaceH4/MATH-500/resolve/main/test.jsonl"),
    Benchmark("minerva_math", "problem", "solution", _boxed_gold,
              f"{QWEN}/minerva_math/test.jsonl"),
    Benchmark("olympiadbench", "question", "final_answer", _olympiad_gold,
              f"{QWEN}/olympiadbench/test.jsonl"),  # a list of LaTeX parts: a set, or ordered parts (_olympiad_gold)
    Benchmark("college_math", "question", "answer", lambda r: as_text(r["answer"]), f"{QWEN}/college_math/test.jsonl"),
    # AIME: 30 problems a year (I and II), integer answers 0-999 (some copies store numbers, some strings)
    Benchmark("aime24", "problem", "answer", lambda r: _stripped(r["answer"]), f"{QWEN}/aime24/test.jsonl"),
    Benchmark("aime25", "problem", "answer", lambda r: _stripped(r["answer"]),
              "https://huggingface.co/datasets/math-ai/aime25/resolve/main/test.jsonl"),
]}

# Named sets for --benchmarks: the paper's first version (the authors' released code, recipe `code`)
# reports five benchmarks; its later text (recipe `paper`) seven.
BENCHMARK_SETS = {
    "code": ["gsm8k", "math500", "minerva_math", "olympiadbench", "college_math"],
    "paper": ["gsm8k", "math500", "minerva_math", "olympiadbench", "college_math", "aime24", "aime25"],
}


def benchmark_names(spec: str) -> list[str]:
    """`code`, `paper` (a named set) or a comma-separated list of benchmark names."""
    return [n.strip() for n in expand_benchmark_set(spec).split(",") if n.strip()]


def expand_benchmark_set(spec: str) -> str:
    """--benchmarks as given -> a comma-separated list: a set's name becomes its members."""
    return ",".join(BENCHMARK_SETS[spec.strip()]) if spec.strip() in BENCHMARK_SETS else spec


def set_description(names: list[str]) -> str:
    """Which of the paper's benchmark sets `names` is, in words (printed before a run)."""
    if names == BENCHMARK_SETS["code"]:
        return "the paper's first version's 5 (recipe code; --benchmarks paper runs the later version's 7)"
    if names == BENCHMARK_SETS["paper"]:
        return "the paper's later version's 7 (recipe paper)"
    return "a subset you chose (--benchmarks code: the first version's 5; paper: the later version's 7)"


@dataclass
class Problem:
    benchmark: str
    id: int  # row number in the benchmark file: stable for a given file, so resume can key on it
    problem: str
    gold: str


def default_cache_dir() -> str:
    return os.path.join(models.cache_root(), "benchmarks")  # beside the tiny model: one cache root


def download(url: str, dest: str, timeout: float = 60.0) -> None:
    """Fetch url to dest atomically (a partial download never looks like a data file)."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    tmp = dest + ".part"
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
        f.write(resp.read())
    os.replace(tmp, dest)


def benchmark_file(name: str, data_dir: Optional[str], cache_dir: str, allow_download: bool = True,
                   url: Optional[str] = None) -> str:
    """Path of a benchmark's JSONL: data_dir first, then the cache, else downloaded into the cache."""
    b = BENCHMARKS[name]
    candidates = [os.path.join(d, f"{name}.jsonl") for d in (data_dir, cache_dir) if d]
    for path in candidates:
        if os.path.isfile(path):
            return path
    where = candidates[0]
    how = (f"place a copy of {name} (JSONL, one problem per line with fields {b.problem_field!r} and "
           f"{b.gold_field!r}) at {where}; the public copy is {url or b.url}")
    if not allow_download:
        raise FileNotFoundError(f"{name}: no local data and downloads are off: {how}")
    dest = os.path.join(cache_dir, f"{name}.jsonl")
    try:
        download(url or b.url, dest)
    except OSError as err:  # URLError, HTTPError, timeouts and file errors are all OSErrors
        raise FileNotFoundError(f"{name}: download failed ({err}). Offline? Then {how}") from err
    return dest


def load_benchmark(name: str, path: str, limit: Optional[int] = None, skipped: Optional[dict] = None) -> list[Problem]:
    """Problems with their gold answers. A malformed line or a missing field is an error naming file and
    line; a row whose problem or gold has no usable value (null, an empty list, an object: see as_text) is
    skipped, counted in `skipped[name]` and reported once on stderr. Problem ids are row numbers, so they
    stay the same whatever is skipped."""
    b = BENCHMARKS[name]
    problems, bad = [], []
    for row_no, (where, row) in enumerate(runs.jsonl_objects(path)):
        missing = [k for k in (b.problem_field, b.gold_field) if k not in row]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing} ({name} needs "
                             f"{b.problem_field!r} and {b.gold_field!r})")
        gold, text = b.gold(row), as_text(row[b.problem_field])
        if not gold or not text:
            bad.append(where)
            continue
        context = as_text(row.get("context"))
        if context:  # OlympiadBench: some problems share a preamble
            text = f"{context}\n\n{text}"
        problems.append(Problem(name, row_no, text, gold))
        if limit is not None and len(problems) >= limit:
            break
    if bad:
        print(f"eval.py: {name}: skipped {len(bad)} row(s) with no usable problem or gold answer "
              f"(fields {b.problem_field!r}, {b.gold_field!r}), first: {bad[0]}", file=sys.stderr)
    if skipped is not None:
        skipped[name] = len(bad)
    if not problems:  # an error, not a 0 averaged into the headline
        raise ValueError(f"{path} holds no problems; put {name}'s rows there (one JSON object a line), "
                         f"or leave {name} out of --benchmarks")
    return problems


# ================================================================================================
# Scoring
# ================================================================================================


def score_answer(extracted: Optional[str], gold: str, where: str = "") -> bool:
    """checker.answers_equal (budgeted, and meant never to raise), guarded once more at the boundary:
    a sample the checker fails on is scored wrong and logged, and the evaluation goes on."""
    try:
        return bool(checker.answers_equal(extracted, gold))
    except (Exception, checker._Timeout) as e:
        print(f"eval.py: the checker failed on {where or 'a sample'} ({type(e).__name__}: {e}); scored wrong",
              file=sys.stderr)
        return False


def score(samples: list[dict]) -> dict:
    """Mean accuracy x 100 over all samples, and its standard error. Samples of one problem are not
    independent, so the error is taken over problems: SE = sd(per-problem accuracy) / sqrt(#problems)."""
    per_problem: dict = {}
    for s in samples:
        per_problem.setdefault(s["id"], []).append(float(s["correct"]))
    accs = [sum(v) / len(v) for v in per_problem.values()]
    n = len(accs)
    mean = sum(accs) / n if n else 0.0  # equal samples per problem: the same as the mean over samples
    sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / (n - 1)) if n > 1 else 0.0
    return {"score": 100 * mean, "se": 100 * sd / math.sqrt(n) if n else 0.0, "problems": n,
            "samples": len(samples), "no_answer": sum(s["extracted"] is None for s in samples),
            "truncated": sum(bool(s.get("truncated")) for s in samples),
            # per-problem accuracy (x 100): what --compare pairs two runs by
            "per_problem": {str(i): 100 * a for i, a in zip(per_problem, accs)}}


def problem_set_id(problems: list[Problem]) -> str:
    """A fingerprint of the problems a benchmark was scored on (ids, texts, golds): two runs with the same
    one answered the same problems, so --compare pairs them problem by problem."""
    rows = sorted((p.id, p.problem, p.gold) for p in problems)
    return hashlib.sha256(json.dumps(rows).encode("utf-8")).hexdigest()[:16]


def summarize(samples: list[dict], benchmarks: list[str], problems: Optional[list[Problem]] = None) -> dict:
    per = {b: score([s for s in samples if s["benchmark"] == b]) for b in benchmarks}
    for b in benchmarks if problems else ():
        per[b]["problem_set"] = problem_set_id([p for p in problems if p.benchmark == b])
    k = len(per)
    avg = {"score": sum(r["score"] for r in per.values()) / k,
           "se": math.sqrt(sum(r["se"] ** 2 for r in per.values())) / k}  # benchmarks are independent
    return {"benchmarks": per, "average": avg}


def format_table(summary: dict) -> str:
    """Score ± se per benchmark, plus how many samples gave no \\boxed answer or hit the token limit."""
    rows = [f"{'benchmark':<15}{'problems':>9}{'samples':>9}{'score':>8}{'± se':>7}{'no answer':>11}{'truncated':>11}"]
    for name, r in summary["benchmarks"].items():
        rows.append(f"{name:<15}{r['problems']:>9}{r['samples']:>9}{r['score']:>8.1f}{r['se']:>7.1f}"
                    f"{r['no_answer']:>11}{r['truncated']:>11}")
    a = summary["average"]
    rows.append(f"{'average':<15}{'':>9}{'':>9}{a['score']:>8.1f}{a['se']:>7.1f}")
    return "\n".join(rows)


def read_summary(path: str) -> dict:
    path = os.path.join(path, "summary.json") if os.path.isdir(path) else path
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def difference(a: Optional[dict], b: Optional[dict]) -> Optional[dict]:
    """B - A for one benchmark's scores, with its standard error: paired by problem when both runs scored
    the same problems (same problem_set and per-problem scores): SE = sd(d_i) / sqrt(#problems) over the
    per-problem differences d_i; otherwise unpaired, SE = sqrt(se_A^2 + se_B^2)."""
    if not a or not b:
        return None
    pa, pb = a.get("per_problem"), b.get("per_problem")
    if a.get("problem_set") and a.get("problem_set") == b.get("problem_set") and pa and pb and set(pa) == set(pb):
        d = [pb[i] - pa[i] for i in pa]
        m = len(d)
        mean = sum(d) / m
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (m - 1)) if m > 1 else 0.0
        return {"delta": mean, "se": sd / math.sqrt(m), "paired": True}
    return {"delta": b["score"] - a["score"], "se": math.sqrt(a["se"] ** 2 + b["se"] ** 2), "paired": False}


def compare(summaries: list[dict]) -> dict:
    """Every run against the first: per benchmark, B - A with its standard error (see difference); the
    average's difference is the mean of the benchmarks' (their errors independent), paired only if every
    benchmark is, and unpaired from the two averages when the benchmark sets differ."""
    first = summaries[0]
    out = []
    for other in summaries[1:]:
        names = list(dict.fromkeys([*first["benchmarks"], *other["benchmarks"]]))
        diffs = {n: difference(first["benchmarks"].get(n), other["benchmarks"].get(n)) for n in names}
        if set(first["benchmarks"]) == set(other["benchmarks"]):
            k = len(diffs)
            diffs["average"] = {"delta": sum(d["delta"] for d in diffs.values()) / k,
                                "se": math.sqrt(sum(d["se"] ** 2 for d in diffs.values())) / k,
                                "paired": all(d["paired"] for d in diffs.values())}
        else:
            diffs["average"] = difference(first["average"], other["average"])
        out.append(diffs)
    return {"differences": out}


def format_compare(summaries: list[dict], labels: list[str]) -> str:
    """A table of each benchmark's score per run, then each run's difference from the first (± se; p:
    paired by problem, u: unpaired)."""
    names = list(dict.fromkeys(n for s in summaries for n in s["benchmarks"])) + ["average"]
    width = max(16, *(len(x) + 2 for x in labels))

    def row(s: dict, n: str) -> Optional[dict]:
        return s["average"] if n == "average" else s["benchmarks"].get(n)

    def cell(r: Optional[dict]) -> str:
        return f"{r['score']:.1f} ± {r['se']:.1f}" if r else "-"

    lines = [f"{'benchmark':<15}" + "".join(f"{x:>{width}}" for x in labels)]
    for n in names:
        cells = [row(s, n) for s in summaries]
        lines.append(f"{n:<15}" + "".join(f"{cell(r):>{width}}" for r in cells))
    if len(summaries) > 1:
        diffs = compare(summaries)["differences"]
        heads = [f"{x} - {labels[0]}" for x in labels[1:]]
        w = max(width, *(len(h) + 2 for h in heads))
        lines += ["", f"difference from {labels[0]} ± its standard error (p: paired by problem, the same "
                  "problems in both; u: unpaired)",
                  f"{'benchmark':<15}" + "".join(f"{h:>{w}}" for h in heads)]
        for n in names:
            cells = []
            for d in diffs:
                r = d.get(n)
                cells.append(f"{r['delta']:+.1f} ± {r['se']:.1f} {'p' if r['paired'] else 'u'}" if r else "-")
            lines.append(f"{n:<15}" + "".join(f"{c:>{w}}" for c in cells))
    return "\n".join(lines)


def compare_warnings(a: dict, b: dict) -> list[str]:
    """Why two summaries may not be comparable: other benchmarks, other problem counts, other settings
    (the model aside: that is what is being compared)."""
    out = []
    ba, bb = set(a["benchmarks"]), set(b["benchmarks"])
    if ba != bb:
        out.append(f"the benchmark sets differ (only in A: {sorted(ba - bb)}, only in B: {sorted(bb - ba)}); "
                   "the averages are over different benchmarks, so their delta means little")
    counts = sorted(n for n in ba & bb if a["benchmarks"][n].get("problems") != b["benchmarks"][n].get("problems"))
    if counts:
        out.append("different numbers of problems in " + ", ".join(
            f"{n} ({a['benchmarks'][n].get('problems')} vs {b['benchmarks'][n].get('problems')})" for n in counts))
    sa, sb = a.get("settings") or {}, b.get("settings") or {}
    diff = [k if k == "prompt" else f"{k} {sa.get(k)!r} vs {sb.get(k)!r}"
            for k in sorted(set(sa) | set(sb)) if k != "model" and sa.get(k) != sb.get(k)]
    if diff:
        out.append("different settings: " + ", ".join(diff))
    return out


# ================================================================================================
# Running
# ================================================================================================


def write_json(path: str, obj) -> None:
    with runs.open_out(path) as f:
        json.dump(obj, f, indent=2)


def read_samples(path: str, repair: bool = True) -> list[dict]:
    """Samples already written. A torn last line (a run killed mid-write) is dropped from the file (only
    rank 0 under torchrun repairs it; the others just skip it)."""
    if not os.path.exists(path):
        return []
    runs.refuse_link(path)
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}, line {i + 1}: not valid JSON; fix or delete the file") from None
            if repair:  # one truncate: a rank reading meanwhile sees the torn line or none, the same samples
                with runs.open_out(path, "a") as f:
                    f.truncate(sum(len(x.encode("utf-8")) for x in lines[:-1]))
    return out


def model_path(name: str) -> str:
    """An opensir.py run directory (one holding ckpt-NNNNN directories) stands for its newest complete
    checkpoint (state.pt is written last); anything else is passed on as given."""
    ckpts = runs.checkpoints(name) if os.path.isdir(name) else []
    if not ckpts:
        return name
    done = [d for d in ckpts if os.path.exists(os.path.join(d, "state.pt"))]
    if not done:
        raise ValueError(f"{name} is an opensir.py run with no complete checkpoint (no ckpt-NNNNN/state.pt "
                         "yet); wait for its first save, or pass a checkpoint directory")
    return done[-1]


def run_config(path: str) -> dict:
    """The opensir.py config a checkpoint was trained with (its run's config.json), else {}."""
    path = os.path.normpath(path)
    run_cfg = os.path.join(os.path.dirname(path), "config.json")
    if not re.fullmatch(r"ckpt-\d{5}", os.path.basename(path)) or not os.path.isfile(run_cfg):
        return {}
    try:
        with open(run_cfg, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="short name (tiny, gemma-2-2b-it, ...), hub id, local path, or an "
                                   "opensir.py run/checkpoint directory")
    p.add_argument("--benchmarks", default="code", type=expand_benchmark_set, help="'code': the first version's five (default); 'paper': the "
                   "later version's seven, adding aime24 and aime25; or a comma-separated list of: " + ", ".join(BENCHMARKS))
    p.add_argument("--data-dir", help="directory holding NAME.jsonl files (default: download)")
    p.add_argument("--cache-dir", default=default_cache_dir(), help="where downloads are kept")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading missing data")
    p.add_argument("--out", help="output directory (default: eval_results/<model>)")
    p.add_argument("--resume", action="store_true", help="continue --out, skipping samples already written")
    p.add_argument("--limit", type=int, help="first N problems of each benchmark")
    p.add_argument("--n", "--samples", dest="n", type=int, default=16, help="samples per problem (under torchrun, "
                   "spell it --samples: torchrun takes --n for an abbreviation of its own --nnodes)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--max-new-tokens", type=int, help="default 4096 (the paper); for --model tiny or toy (or "
                   "a run of one), that run's student budget (opensir.SMALL_MODEL_DEFAULTS). Reasoning models (DeepSeek-R1-Distill, Qwen3) think "
                   "at length: the paper's later version gives them 38912")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call (with --engine "
                   "continuous, keep it on --resume for samples identical to an uninterrupted eval)")
    p.add_argument("--engine", default="auto", choices=["auto", *engines.ENGINES],
                   help="generation engine (as opensir.py --engine); 'auto': by device")
    p.add_argument("--kv-cache-gib", type=float, default=0.0, help="cap on the continuous engine's KV cache (0: none)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", nargs="+", metavar="RUN", help="print the summaries of any number of runs "
                   "(summary.json files or --out dirs) side by side, and each one's difference from the first "
                   "with its standard error")
    p.add_argument("--all-checkpoints", action="store_true", help="with --model RUN_DIR (an opensir.py run): "
                   "evaluate every complete checkpoint into OUT/ckpt-NNNNN and print one table, step x benchmark")
    return p


def arg_errors(args) -> list[str]:
    """Every bad value that can be seen without loading anything, each naming its flag."""
    errs = []
    for flag in ("n", "limit", "batch_size", "max_new_tokens"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            errs.append(f"--{flag.replace('_', '-')} must be >= 1 (got {v})"
                        + ("; leave it out for every problem" if flag == "limit" else ""))
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        errs.append(f"--temperature must be > 0: need a finite --temperature (got {args.temperature})")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        errs.append(f"--top-p must be in (0, 1] (got {args.top_p})")
    if args.top_k < 0:
        errs.append(f"--top-k must be >= 0, 0 for off (got {args.top_k})")
    if not (math.isfinite(args.kv_cache_gib) and args.kv_cache_gib >= 0):
        errs.append(f"--kv-cache-gib must be a finite number >= 0, 0 for no cap (got {args.kv_cache_gib})")
    if args.seed < 0:
        errs.append(f"--seed must be >= 0 (got {args.seed})")
    return errs


def sample_chunks(problems: list[Problem], n: int, size: int) -> list[list[tuple]]:
    """Every (problem, sample index) of an eval in chunks of `size`, built from the keys alone: each
    benchmark's samples in order (problem, then sample), cut every `size`. The chunks are the same however
    many samples are already on disk, so a chunk regenerated after a kill is the chunk an uninterrupted
    eval generated."""
    chunks = []
    for name in dict.fromkeys(p.benchmark for p in problems):
        keys = [(p, k) for p in problems if p.benchmark == name for k in range(n)]
        chunks += [keys[i:i + size] for i in range(0, len(keys), size)]
    return chunks


def sample_seed(seed: int, benchmark: str, problem_id: int, k: int) -> int:
    """The seed of one sample: a function of (--seed, benchmark, problem id, sample index) alone. The
    generate engine draws each sample from its own stream (engines.seeded_sampler), so a sample does not
    depend on its chunk, --batch-size or rank; the continuous engine seeds a whole call from its first
    sample's seed."""
    import numpy as np
    key = [seed, zlib.crc32(benchmark.encode("utf-8")), problem_id, k]
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)


def compare_label(path: str) -> str:
    """A run's column in --compare: its --out directory's name, or a summary file's name less .json."""
    path = os.path.normpath(path)
    if os.path.basename(path) == "summary.json":
        path = os.path.dirname(path) or "."
    name = os.path.basename(os.path.abspath(path))
    return name[:-5] if name.endswith(".json") else name


def continue_command(argv: list) -> str:
    return "python eval.py " + shlex.join(argv if "--resume" in argv else [*argv, "--resume"])


def count_samples(path: str) -> int:
    try:
        return len(read_samples(path, repair=False))
    except (OSError, ValueError, SystemExit):
        return 0


def main(argv: Optional[list] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.compare:
        summaries = []
        for x in args.compare:
            try:
                summaries.append(read_summary(x))
            except (OSError, ValueError) as err:
                sys.exit(f"eval.py: --compare {x}: {err}")
        labels = [compare_label(x) for x in args.compare]
        if len(set(labels)) < len(labels):
            labels = list(args.compare)
        print(format_compare(summaries, labels))
        for label, s in zip(labels[1:], summaries[1:]):
            for w in compare_warnings(summaries[0], s):
                print(f"warning: {label} vs {labels[0]}: {w}", file=sys.stderr)
        return {"labels": labels, **compare(summaries)}
    if not args.model:
        sys.exit("eval.py: --model is required (or --compare RUN ...)")
    # every check that needs no model comes first: a typo should not cost a model load
    errs = arg_errors(args)
    if errs:
        sys.exit("eval.py: " + "; ".join(errs))
    if args.all_checkpoints:
        ckpts = runs.checkpoints(args.model) if os.path.isdir(args.model) else []
        paths = [d for d in ckpts if os.path.exists(os.path.join(d, "state.pt"))]
        if not paths:
            sys.exit(f"eval.py: --all-checkpoints needs --model RUN_DIR, an opensir.py run with a complete "
                     f"checkpoint (ckpt-NNNNN/state.pt); {args.model} has none")
    else:
        try:
            paths = [model_path(args.model)]
        except ValueError as err:
            sys.exit(f"eval.py: {err}")
    if models.model_name_error(paths[0]):
        sys.exit(f"eval.py: {models.model_name_error(paths[0])}")
    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        sys.exit(f"eval.py: unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    skipped: dict = {}
    try:
        problems = [p for n in names for p in load_benchmark(
            n, benchmark_file(n, args.data_dir, args.cache_dir, not args.no_download), args.limit, skipped)]
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"eval.py: {err}")
    unreachable = models.hub_error(models.MODELS.get(paths[0], paths[0]))
    if unreachable:  # before transformers spends ~30 s retrying a hub it cannot reach
        sys.exit(f"eval.py: {unreachable}")
    out = args.out or os.path.join("eval_results", args.model.strip("/").replace("/", "_"))
    if not args.all_checkpoints:
        return evaluate(args, paths[0], out, argv, names, problems, skipped)
    return evaluate_all(args, paths, out, argv, names, problems, skipped)


def evaluate_all(args, paths: list, out: str, argv: list, names: list, problems: list, skipped: dict) -> dict:
    """Each checkpoint of a run into OUT/ckpt-NNNNN (resumable like one eval), then one table."""
    if os.path.isfile(out):
        sys.exit(f"eval.py: --out {out} is a file; choose another --out")
    subs = [os.path.join(out, os.path.basename(os.path.normpath(p))) for p in paths]
    for sub in subs:
        runs.refuse_link(sub)
    started = [s for s in subs if count_samples(os.path.join(s, "samples.jsonl"))]
    if started and not args.resume:
        sys.exit(f"eval.py: {out} already holds evaluations ({', '.join(map(os.path.basename, started))}); "
                 "pass --resume to continue them (checkpoints done are kept), or another --out")
    results = {}
    for i, (path, sub) in enumerate(zip(paths, subs)):
        print(f"checkpoint {i + 1} of {len(paths)}: {path} -> {sub}")
        results[runs.checkpoint_step(path)] = evaluate(args, path, sub, argv, names, problems, skipped)
    table = {"benchmarks": names, "checkpoints": {
        str(step): {**{n: {k: r["benchmarks"][n][k] for k in ("score", "se")} for n in names},
                    "average": r["average"]} for step, r in results.items()}}
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "checkpoints.json"), table)
    print(format_checkpoints(table))
    print(f"table: {os.path.join(out, 'checkpoints.json')}")
    return table


def format_checkpoints(table: dict) -> str:
    """One row a checkpoint (its step), one column a benchmark and the average: score ± se."""
    cols = [*table["benchmarks"], "average"]
    w = max(14, *(len(c) + 2 for c in cols))
    lines = [f"{'step':>8}" + "".join(f"{c:>{w}}" for c in cols)]
    for step, row in table["checkpoints"].items():
        lines.append(f"{step:>8}" + "".join(f"{row[c]['score']:.1f} ± {row[c]['se']:.1f}".rjust(w) for c in cols))
    return "\n".join(lines)


def evaluate(args, path: str, out: str, argv: list, names: list, problems: list, skipped: dict) -> dict:
    """One model into one --out: Ctrl-C keeps what is on disk and says the command that continues it."""
    samples_path = os.path.join(out, "samples.jsonl")
    try:
        return _evaluate(args, path, out, names, problems, skipped)
    except KeyboardInterrupt:
        if parallel.dist_env()[0] == 0:
            print(f"\neval.py: interrupted; {count_samples(samples_path)} samples kept in {samples_path}. "
                  f"To continue: {continue_command(argv)}", file=sys.stderr)
        raise SystemExit(130) from None


def _evaluate(args, path: str, out: str, names: list, problems: list, skipped: dict) -> dict:
    rank, world = parallel.dist_env()
    say = print if rank == 0 else (lambda *a, **k: None)  # under torchrun, rank 0 speaks
    if path != args.model and not args.all_checkpoints:
        say(f"{args.model}: evaluating its newest checkpoint, {path}")
    trained = run_config(path)
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:  # a built-in model (or a run of it) answers in a few dozen tokens, or rambles on
        small = opensir.SMALL_MODEL_DEFAULTS.get(trained.get("model", args.model))
        max_new_tokens = trained.get("student_max_new_tokens", small["student_max_new_tokens"]) if small else 4096

    samples_path, summary_path = os.path.join(out, "samples.jsonl"), os.path.join(out, "summary.json")
    settings_path = os.path.join(out, "settings.json")
    # what makes samples comparable (--n and --limit may grow on resume: samples are keyed by index);
    # the model is the checkpoint itself, so a run directory that gained a newer one is a new model
    settings = {"model": path, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                "max_new_tokens": max_new_tokens}
    settings["prompt"] = opensir.STUDENT_PROMPT
    if os.path.isfile(out) or (os.path.exists(out) and not os.access(out, os.W_OK)):
        sys.exit(f"eval.py: --out {out} is a file or cannot be written; choose another --out")
    for name in (".lock", "samples.jsonl", "summary.json", "settings.json"):
        runs.refuse_link(os.path.join(out, name))  # planted links are refused before anything is opened
    if rank == 0:  # rank 0 alone writes OUT: a second eval into it would interleave samples
        os.makedirs(out, exist_ok=True)
        runs.open_out(os.path.join(out, ".lock"), "a").close()  # a regular file, never a link, before it is locked
        runs.lock_out(out)
    try:
        done = read_samples(samples_path, repair=rank == 0)  # an eval stopped before its first sample left nothing to protect
    except ValueError as err:
        sys.exit(f"eval.py: {err}")
    if done and not args.resume:
        sys.exit(f"eval.py: {samples_path} exists; pass --resume to continue it, or another --out")
    if done and os.path.exists(settings_path):
        with open(settings_path, encoding="utf-8") as f:
            old = json.load(f)
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            sys.exit(f"eval.py: --resume with settings other than {out} was run with: {changed}")
    have = {(s["benchmark"], s["id"], s["sample"]) for s in done}
    # A chunk is generated whole or not at all (its samples depend on each other through the batch): one
    # with any sample missing (a torn line, a kill mid-wave) is regenerated whole, and only its missing
    # samples are written.
    chunks = [c for c in sample_chunks(problems, args.n, args.batch_size)
              if any((p.benchmark, p.id, k) not in have for p, k in c)]
    todo = sum((p.benchmark, p.id, k) not in have for c in chunks for p, k in c)
    say(f"{len(problems)} problems x {args.n} samples: {todo} to generate, {len(have)} already in {out}")
    say(f"evaluating {', '.join(names)}: {set_description(names)}")

    # Under torchrun (WORLD_SIZE > 1) the chunks are dealt out to the ranks in turn (chunk c to rank c mod N);
    # each wave of N chunks is gathered to rank 0, which appends it in chunk order: the same samples.jsonl
    # as one process, because every chunk is seeded from its keys alone, whoever generates it.
    if world > 1 and chunks:
        import datetime
        import torch
        import torch.distributed as dist
        cuda = models.pick_device(args.device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=1800))
    if rank == 0:
        write_json(settings_path, settings)
    if chunks:
        model, tok = opensir.load_model(path, device=args.device, dtype=args.dtype)
        try:
            engine = engines.make_engine(args.engine, model, opensir.eos_token_ids(model, tok), tok.pad_token_id,
                                         args.batch_size, args.kv_cache_gib, log=say)
        except ValueError as err:  # the continuous engine would drop Gemma-2's soft-capping
            sys.exit(f"eval.py: {err}")
        say(f"engine: {engine.name}")
        sampling = engines.Sampling(args.temperature, args.top_k, args.top_p)
        from tqdm.auto import tqdm
        bar = tqdm(total=todo, desc="eval", dynamic_ncols=True, disable=rank != 0)
        try:  # the bar is closed before any message (Ctrl-C's included)
            with runs.open_out(samples_path, "a") if rank == 0 else open(os.devnull, "w") as f:
                # one generate call per chunk: samples are on disk (resumable) after every wave of chunks
                for wave in range(0, len(chunks), world):
                    rows = []
                    if wave + rank < len(chunks):
                        chunk = chunks[wave + rank]
                        prompts = [opensir.chat(tok, opensir.student_prompt(p.problem)) for p, _ in chunk]
                        seeds = [sample_seed(args.seed, p.benchmark, p.id, k) for p, k in chunk]
                        comps = opensir.generate(engine, tok, prompts, max_new_tokens, sampling, seeds)
                        for (p, k), c in zip(chunk, comps):
                            if (p.benchmark, p.id, k) in have:
                                continue
                            ans = opensir.final_answer(c.text)  # the last \boxed{}, as math-verify's first_match
                            ok = score_answer(ans, p.gold, f"{p.benchmark} problem {p.id} sample {k}")
                            rows.append({
                                "benchmark": p.benchmark, "id": p.id, "sample": k, "completion": c.text,
                                "extracted": ans, "gold": p.gold, "correct": ok,
                                "truncated": c.truncated, "tokens": len(c.ids)})
                    parts = [rows]
                    if world > 1:
                        parts = [None] * world
                        dist.gather_object(rows, parts if rank == 0 else None, dst=0)
                    for part in parts if rank == 0 else ():
                        f.writelines(json.dumps(r) + "\n" for r in part)
                    f.flush()
                    bar.update(sum((p.benchmark, p.id, k) not in have
                                   for c in chunks[wave:wave + world] for p, k in c))
        finally:
            bar.close()
        if world > 1:
            dist.destroy_process_group()
    if rank:
        return {}  # rank 0 writes the summary

    wanted = {(p.benchmark, p.id) for p in problems}
    samples = [s for s in read_samples(samples_path) if (s["benchmark"], s["id"]) in wanted and s["sample"] < args.n]
    summary = {"settings": {**settings, "n": args.n, "limit": args.limit, "seed": args.seed,
                            "batch_size": args.batch_size},
               **summarize(samples, names, problems), "skipped_rows": {n: skipped.get(n, 0) for n in names}}
    write_json(summary_path, summary)
    print(format_table(summary))
    print(f"samples: {samples_path}\nsummary: {summary_path}")
    return summary


if __name__ == "__main__":
    status = 0
    try:
        main()
    except OSError as err:  # a model that cannot load, a full disk: one clear line, not a traceback
        status = f"eval.py: {err}"
    except KeyboardInterrupt:  # before any output directory was touched
        status = "\neval.py: interrupted before anything was written; run the same command again"
    except SystemExit as err:
        status = err.code
    parallel.exit_process(status)  # under torchrun: skip the teardown, which can abort a finished run
    sys.exit(status)
