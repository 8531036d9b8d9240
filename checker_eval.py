"""Scores the answer checker (and math-verify, where installed) on a labelled pair file, per kind.

    python checker_eval.py [data/checker_pairs.jsonl] [--show KIND] [--no-math-verify]

Each line of the pair file: {"kind", "source", "pred", "gold", "label"}; label is the truth (is pred
a correct answer for gold?). Prints one row per kind: pairs, agreement, false "equal", false
"unequal", for this project's checker and for math-verify 0.9.0 (requirements-compare.txt), plus the
slowest pair of each. --show KIND lists the pairs a checker gets wrong.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict

import checker


def math_verify_equal():
    """math-verify's verdict as a function (pred, gold) -> bool, or None where it is not installed.
    Both strings are given to it boxed, the form its LaTeX extraction reads first."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None

    def equal(pred: str, gold: str) -> bool:
        # an ordered gold (checker.ordered_parts) reaches it as a bare list, a form it reads
        gold = re.sub(r"^\\langle (.*) \\rangle$", r"\1", gold)
        try:
            g, p = parse("\\boxed{" + gold + "}"), parse("\\boxed{" + pred + "}")
            return bool(verify(g, p))
        except Exception:  # its own time budget and parser errors: unequal
            return False
    return equal


def score(pairs: list[dict], equal) -> dict:
    """Per kind (and "all"): n, right, false_equal, false_unequal, slowest seconds, and the wrong pairs."""
    out = defaultdict(lambda: {"n": 0, "right": 0, "false_equal": 0, "false_unequal": 0, "slowest": 0.0, "wrong": []})
    for p in pairs:
        t = time.perf_counter()
        got = equal(p["pred"], p["gold"])
        dt = time.perf_counter() - t
        for k in (p["kind"], "all"):
            row = out[k]
            row["n"] += 1
            row["slowest"] = max(row["slowest"], dt)
            if got == p["label"]:
                row["right"] += 1
            else:
                row["false_equal" if got else "false_unequal"] += 1
                if k != "all":
                    row["wrong"].append(p)
    return dict(out)


def table(results: dict[str, dict]) -> str:
    """A markdown table: one row per kind, the checkers side by side."""
    names = list(results)
    kinds = sorted({k for r in results.values() for k in r if k != "all"}) + ["all"]
    head = "| kind | pairs | " + " | ".join(f"{n}: agreement | false eq. | false uneq." for n in names) + " |"
    rows = [head, "|" + "---|" * (2 + 3 * len(names))]
    for k in kinds:
        first = results[names[0]][k]
        cells = []
        for n in names:
            r = results[n][k]
            cells += [f"{100 * r['right'] / r['n']:.1f}%", str(r["false_equal"]), str(r["false_unequal"])]
        rows.append(f"| {k} | {first['n']} | " + " | ".join(cells) + " |")
    rows.append("| slowest pair (s) | | " + " | ".join(f"{results[n]['all']['slowest']:.2f} | |" for n in names) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="?", default="data/checker_pairs.jsonl")
    ap.add_argument("--show", default="", help="list the pairs of this kind a checker gets wrong ('all': every kind)")
    ap.add_argument("--no-math-verify", action="store_true")
    args = ap.parse_args()
    with open(args.pairs, encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    checkers = {"this project": checker.answers_equal}
    mv = None if args.no_math_verify else math_verify_equal()
    if mv is not None:
        checkers["math-verify"] = mv
    for fn in checkers.values():  # imports (sympy) happen here, not inside the first pair's time
        fn("1", "2")
    results = {name: score(pairs, fn) for name, fn in checkers.items()}
    print(table(results))
    if args.show:
        for name, res in results.items():
            for k, row in res.items():
                if k != "all" and args.show in (k, "all"):
                    for p in row["wrong"]:
                        print(f"[{name}] {k} label={p['label']}: {p['pred']!r} vs {p['gold']!r} ({p['source']})")


if __name__ == "__main__":
    main()
