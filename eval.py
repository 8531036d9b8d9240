"""Evaluate a model on the maths benchmarks of the OpenSIR paper.

    python eval.py --model gemma-2-2b-it                   # the first version's five, the paper's settings
    python eval.py --model gemma-2-2b-it --benchmarks paper  # the later version's seven (adds AIME 2024, 2025)
    python eval.py --model runs/opensir --benchmarks gsm8k --limit 50
    python eval.py --compare eval_results/a eval_results/b

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
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

import checker
import opensir

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


def _gsm8k_gold(row: dict) -> Optional[str]:
    """The solution text ends in `#### 70,000`; the number is the answer."""
    tail = row["answer"].rsplit("####", 1)
    return tail[1].strip().replace(",", "") if len(tail) == 2 else None


_NAMES_PARTS = re.compile(r"\$[^$]{1,60}\$\s*,?\s*and\s+\$[^$]{1,60}\$|minimum and maximum|smallest and largest|"
                          r"largest and smallest|how many of each", re.I)
_ASKS_A_SET = re.compile(r"(?<!for )\ball\b|\bsolutions?\b|\btwo possible\b|\bwhich satisfy\b|\bfor which\b|\banother\b|\bother\b|\bpossible values\b", re.I)


def _olympiad_gold(row: dict) -> Optional[str]:
    """`final_answer` is a list of LaTeX strings. Several parts (or one with commas) are a set of
    answers, unless the question names the parts it asks for (`determine $b$ and $c$`, `the minimum
    and maximum`) and asks for no set of solutions: then they are ordered, and the gold is written
    checker.ordered_parts, which the checker compares part by part, in order."""
    parts = row["final_answer"]
    if not (isinstance(parts, list) and parts):
        return None
    if row.get("is_multiple_answer") and _NAMES_PARTS.search(row.get("question") or "") and \
            not _ASKS_A_SET.search(row.get("question") or ""):
        return checker.ordered_parts(parts)
    return ", ".join(parts)


BENCHMARKS = {b.name: b for b in [
    Benchmark("gsm8k", "question", "answer", _gsm8k_gold, f"{QWEN}/gsm8k/test.jsonl"),
    Benchmark("math500", "problem", "answer", lambda r: r["answer"],
              "https://huggingface.co/datasets/HuggingFaceH4/MATH-500/resolve/main/test.jsonl"),
    Benchmark("minerva_math", "problem", "solution", lambda r: checker.extract_boxed(r["solution"], last=True),
              f"{QWEN}/minerva_math/test.jsonl"),
    Benchmark("olympiadbench", "question", "final_answer", _olympiad_gold, f"{QWEN}/olympiadbench/test.jsonl"),
    Benchmark("college_math", "question", "answer", lambda r: r["answer"], f"{QWEN}/college_math/test.jsonl"),
    # AIME: 30 problems a year (I and II), integer answers 0-999 (some copies store numbers, some strings)
    Benchmark("aime24", "problem", "answer", lambda r: str(r["answer"]).strip(), f"{QWEN}/aime24/test.jsonl"),
    Benchmark("aime25", "problem", "answer", lambda r: str(r["answer"]).strip(),
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
    return os.path.join(opensir.cache_root(), "benchmarks")  # beside the tiny model: one cache root


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


def load_benchmark(name: str, path: str, limit: Optional[int] = None) -> list[Problem]:
    """Problems with their gold answers; any malformed line is an error naming file and line."""
    b = BENCHMARKS[name]
    problems = []
    for where, row in opensir.jsonl_objects(path):
        missing = [k for k in (b.problem_field, b.gold_field) if k not in row]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing} ({name} needs "
                             f"{b.problem_field!r} and {b.gold_field!r})")
        gold = b.gold(row)
        if not gold:
            raise ValueError(f"{where}: no gold answer in field {b.gold_field!r}")
        text = row[b.problem_field]
        if row.get("context"):  # OlympiadBench: some problems share a preamble
            text = f"{row['context']}\n\n{text}"
        problems.append(Problem(name, len(problems), text, gold))
        if limit is not None and len(problems) >= limit:
            break
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
            "truncated": sum(bool(s.get("truncated")) for s in samples)}


def summarize(samples: list[dict], benchmarks: list[str]) -> dict:
    per = {b: score([s for s in samples if s["benchmark"] == b]) for b in benchmarks}
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


def format_compare(a: dict, b: dict, name_a: str, name_b: str) -> str:
    """Two summaries side by side, with B - A."""
    names = list(dict.fromkeys([*a["benchmarks"], *b["benchmarks"]]))
    rows = [f"{'benchmark':<15}{name_a[-14:]:>15}{name_b[-14:]:>15}{'delta':>9}"]

    def cell(r: Optional[dict]) -> str:
        return f"{r['score']:.1f} ± {r['se']:.1f}" if r else "-"

    for n in names + ["average"]:
        ra = a["average"] if n == "average" else a["benchmarks"].get(n)
        rb = b["average"] if n == "average" else b["benchmarks"].get(n)
        delta = f"{rb['score'] - ra['score']:+.1f}" if ra and rb else "-"
        rows.append(f"{n:<15}{cell(ra):>15}{cell(rb):>15}{delta:>9}")
    return "\n".join(rows)


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


def read_samples(path: str, repair: bool = True) -> list[dict]:
    """Samples already written. A torn last line (a run killed mid-write) is dropped from the file (only
    rank 0 under torchrun repairs it; the others just skip it)."""
    if not os.path.exists(path):
        return []
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
                os.truncate(path, sum(len(x.encode("utf-8")) for x in lines[:-1]))
    return out


def model_path(name: str) -> str:
    """An opensir.py run directory (one holding ckpt-NNNNN directories) stands for its newest complete
    checkpoint (state.pt is written last); anything else is passed on as given."""
    ckpts = opensir.checkpoints(name) if os.path.isdir(name) else []
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
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    p.add_argument("--engine", default="auto", choices=["auto", *opensir.ENGINES],
                   help="generation engine (as opensir.py --engine); 'auto': by device")
    p.add_argument("--kv-cache-gib", type=float, default=0.0, help="cap on the continuous engine's KV cache")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print two summaries (files or --out dirs)")
    return p


def main(argv: Optional[list] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.compare:
        a, b = (read_summary(x) for x in args.compare)
        labels = [os.path.basename(os.path.normpath(x if os.path.isdir(x) else os.path.dirname(x) or x))
                  for x in args.compare]  # the --out directory names
        print(format_compare(a, b, *labels))
        for w in compare_warnings(a, b):
            print(f"warning: {w}", file=sys.stderr)
        return {}
    if not args.model:
        sys.exit("eval.py: --model is required (or --compare A B)")
    # every check that needs no model comes first: a typo should not cost a model load
    try:
        path = model_path(args.model)
    except ValueError as err:
        sys.exit(f"eval.py: {err}")
    rank, world = opensir.dist_env()
    say = print if rank == 0 else (lambda *a, **k: None)  # under torchrun, rank 0 speaks
    if path != args.model:
        say(f"{args.model}: evaluating its newest checkpoint, {path}")
    trained = run_config(path)
    if args.max_new_tokens is None:  # a built-in model (or a run of it) answers in a few dozen tokens, or rambles on
        small = opensir.SMALL_MODEL_DEFAULTS.get(trained.get("model", args.model))
        args.max_new_tokens = trained.get("student_max_new_tokens", small["student_max_new_tokens"]) if small else 4096
    if args.limit is not None and args.limit < 1:
        sys.exit("eval.py: --limit must be >= 1 (leave it out for every problem)")
    if not (math.isfinite(args.temperature) and args.temperature > 0 and 0 < args.top_p <= 1 and args.top_k >= 0):
        sys.exit("eval.py: need a finite --temperature > 0, --top-p in (0, 1] and --top-k >= 0 (0: off); got "
                 f"{args.temperature}, {args.top_p}, {args.top_k}")
    if opensir.model_name_error(model_path(args.model)):
        sys.exit(f"eval.py: {opensir.model_name_error(model_path(args.model))}")
    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        sys.exit(f"eval.py: unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    for flag in ("n", "max_new_tokens", "batch_size"):
        if getattr(args, flag) < 1:
            sys.exit(f"eval.py: --{flag.replace('_', '-')} must be >= 1")
    try:
        problems = [p for n in names for p in load_benchmark(
            n, benchmark_file(n, args.data_dir, args.cache_dir, not args.no_download), args.limit)]
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"eval.py: {err}")
    unreachable = opensir.hub_error(opensir.MODELS.get(path, path))
    if unreachable:  # before transformers spends ~30 s retrying a hub it cannot reach
        sys.exit(f"eval.py: {unreachable}")

    out = args.out or os.path.join("eval_results", args.model.strip("/").replace("/", "_"))
    samples_path, summary_path = os.path.join(out, "samples.jsonl"), os.path.join(out, "summary.json")
    settings_path = os.path.join(out, "settings.json")
    # what makes samples comparable (--n and --limit may grow on resume: samples are keyed by index);
    # the model is the checkpoint itself, so a run directory that gained a newer one is a new model
    settings = {k: getattr(args, k) for k in ("model", "temperature", "top_p", "top_k", "max_new_tokens")}
    settings["model"] = path
    settings["prompt"] = opensir.STUDENT_PROMPT
    if os.path.isfile(out) or (os.path.exists(out) and not os.access(out, os.W_OK)):
        sys.exit(f"eval.py: --out {out} is a file or cannot be written; choose another --out")
    if rank == 0:  # rank 0 alone writes OUT: a second eval into it would interleave samples
        opensir.lock_out(out)
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
    todo = [(p, k) for p in problems for k in range(args.n) if (p.benchmark, p.id, k) not in have]
    say(f"{len(problems)} problems x {args.n} samples: {len(todo)} to generate, {len(have)} already in {out}")
    say(f"evaluating {', '.join(names)}: {set_description(names)}")

    # Under torchrun (WORLD_SIZE > 1) the chunks are dealt out to the ranks in turn (chunk c to rank c mod N);
    # each wave of N chunks is gathered to rank 0, which appends it in chunk order: the same samples.jsonl
    # as one process, because every chunk is seeded from (--seed, c) alone, whoever generates it.
    if world > 1 and todo:
        import datetime
        import torch
        import torch.distributed as dist
        cuda = opensir.pick_device(args.device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=1800))
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(settings_path, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)
    if todo:
        model, tok = opensir.load_model(model_path(args.model), device=args.device, dtype=args.dtype)
        try:
            say(f"engine: {opensir.resolve_engine(args.engine, model)}")
        except ValueError as err:  # the continuous engine would drop Gemma-2's soft-capping
            sys.exit(f"eval.py: {err}")
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="eval", dynamic_ncols=True, disable=rank != 0)
        chunks = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
        with open(samples_path, "a", encoding="utf-8") if rank == 0 else open(os.devnull, "w") as f:
            # one generate call per chunk: samples are on disk (resumable) after every wave of chunks
            for wave in range(0, len(chunks), world):
                rows = []
                if wave + rank < len(chunks):
                    chunk = chunks[wave + rank]
                    opensir.set_seed(opensir.round_seed(args.seed, 0, wave + rank))
                    prompts = [opensir.chat(tok, opensir.student_prompt(p.problem)) for p, _ in chunk]
                    comps = opensir.generate(model, tok, prompts, args.max_new_tokens, args.temperature,
                                             args.top_k, args.top_p, args.batch_size, engine=args.engine,
                                             kv_cache_gib=args.kv_cache_gib)
                    for (p, k), c in zip(chunk, comps):
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
                bar.update(sum(len(chunks[c]) for c in range(wave, min(wave + world, len(chunks)))))
        bar.close()
        if world > 1:
            dist.destroy_process_group()
    if rank:
        return {}  # rank 0 writes the summary

    wanted = {(p.benchmark, p.id) for p in problems}
    samples = [s for s in read_samples(samples_path) if (s["benchmark"], s["id"]) in wanted and s["sample"] < args.n]
    summary = {"settings": {**settings, "n": args.n, "limit": args.limit}, **summarize(samples, names)}
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(format_table(summary))
    print(f"samples: {samples_path}\nsummary: {summary_path}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except OSError as err:  # a model that cannot load, a full disk: one clear line, not a traceback
        sys.exit(f"eval.py: {err}")
