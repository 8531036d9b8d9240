"""Answer strings and the evaluation answer checker: is a predicted final answer the gold one?

Plumbing beside opensir.py; a first reading can skip it. Two parts: the answer strings training uses
(final_answer reads a completion's last \\boxed{}, normalize_answer is the vote key, string work only),
then the evaluation checker: eval.py scores benchmarks with answers_equal, which shares that clean-up
and adds structure (tuples, intervals, sets, matrices), exact numbers, and sympy for what is left.
Training never calls answers_equal.

Model outputs can be anything, so: the whole comparison runs under a time budget (SIGALRM); the
string work is linear in the input (the clean-up collapses white space first and uses no
pattern that can backtrack; answers over MAX_ANSWER_CHARS are equal only to the same text); exact
big-number arithmetic, which runs in C where no alarm reaches it, is bounded before sympy starts
(_small); and no exception leaves answers_equal.
"""
from __future__ import annotations

import cmath
import functools
import re
import time
from fractions import Fraction
from typing import Optional


# ================================================================================================
# Answer strings: the final answer of a completion, and the training vote key
# ================================================================================================
# normalize_answer is the training vote key: string work only (cheap, deterministic), so `1/2`, `\dfrac12` and
# `0.5` land on one key. The evaluation checker below (used by eval.py) builds on the same
# clean-up and adds structure, exact numbers and symbolic algebra; training never needs it.
# Students write anything, so every step here is linear in the input: runs of white space are first
# collapsed to one space, no pattern repeats a group whose matches can overlap, and an answer longer
# than MAX_ANSWER_CHARS gets no key (no real final answer is that long: the longest gold of the five
# benchmarks has 993 characters).
MAX_ANSWER_CHARS = 2000
_MAX_NUMBER_CHARS = 1000  # a longer "number" is compared as text (int() refuses over 4,300 digits)
_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_BARE_BOX = re.compile(r"[^\s${}]+")


def extract_boxed(text: str, last: bool = False) -> Optional[str]:
    """Content of the first (or last) \\boxed{...} / \\fbox{...} with balanced braces, or None.
    Also takes the brace-less `\\boxed 5` form (one token). One pass over the text: the matching
    brace of every `{` is found with a stack, so unclosed boxes cost nothing extra."""
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    closes, stack = {}, []
    for m in re.finditer(r"\\[\\{}]|[{}]", text[starts[0]:]):  # `\{ \}` are printed braces (`\\` a break)
        if m.group()[0] == "\\":
            continue
        if m.group() == "{":
            stack.append(m.start() + starts[0])
        elif stack:
            closes[stack.pop()] = m.start() + starts[0]
    for i in (reversed(starts) if last else starts):
        if i < len(text) and text[i] == "{":
            if i in closes:
                return text[i + 1:closes[i]]
        else:
            m = _BARE_BOX.match(text, i)
            if m:
                return m.group(0)
    return None


def final_answer(completion: str) -> Optional[str]:
    """The answer a completion gives: its last \\boxed{} (the authors' math-verify `first_match`
    takes the right-most match), so a solution that corrects itself is read at its end. Training's
    vote and eval.py both read answers here."""
    return extract_boxed(completion, last=True)


_UNIT_WORD = re.compile(  # a unit or currency word, dropped after a number; one word, no repetition
    r"(?:sq|square|cubic)?(?:units?|cm|mm|km|m|meters?|metres?|inch(?:es)?|in|feet|foot|ft|"
    r"yards?|miles?|mph|kg|g|grams?|pounds?|lbs?|ounces?|oz|liters?|litres?|gallons?|ml|l|seconds?|"
    r"s|sec|minutes?|mins?|hours?|hrs?|h|days?|weeks?|months?|years?|dollars?|cents?|usd|euros?|"
    r"degrees?|deg|radians?|rad|percent|students?|people|persons?|men|women|children|boys|girls|"
    r"apples?|books?|cookies?|eggs?|marbles?|pages?|points?|ways?|times|items?|pieces?|coins?|"
    r"cars?|trees?|balls?|(?:kilo|centi|milli)(?:grams?|meters?|metres?|liters?|litres?))\.?(?:\^\{?\d\}?)?|"
    r"sq|square|cubic", re.I)
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname|rm)\s*\{([^{}]*)\}")
_TEXT_UNIT_TAIL = re.compile(r"([\d}).])\s?" + _TEXT_CMD.pattern + r"\s?(\^\{?\d\}?)?\s?$")
_SPACING = re.compile(r"\\left\.|\\right\.|\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])|"
                      r"(?<!\\)\\[,;:! ]|\\q?quad|\\displaystyle|\\mathstrut|~")
_NAME = r"[a-zA-Z](?:_\w|_\{[^{}]*\})?(?:\^\{-1\}|\^-1|\^T|\^\{T\})?(?:\s?\(\s?[a-zA-Z]\s?\))?"  # x, y_2, a_{n}, B^{-1}, f(x)
_NAMED = re.compile(r"(" + _NAME + r")\s?(?:=|\\in)\s?(.+)")
_NAME_RE = re.compile(_NAME)


def _clean(ans: Optional[str], units: bool = True) -> str:
    """String clean-up shared by the vote key and the checker; returns a space-free string."""
    return _clean_parts(ans, units)[1]


def _clean_parts(ans: Optional[str], units: bool = True) -> tuple[str, str]:
    """(name, answer): see _clean_unit."""
    name, s, _ = _clean_unit(ans, units)
    return name, s


def _clean_unit(ans: Optional[str], units: bool = True) -> tuple[str, str, str]:
    """(name, answer, unit): `y_2 = x e^x` -> ("y_2", "xe^x"), and `x e^x = y_2` the same; name "" when
    the answer is not named. units=False keeps trailing words and \\text{} (to compare `37/4 m` with
    `37/4m` as written). ("", "", "") for an answer over MAX_ANSWER_CHARS. unit: the unit
    removed after a number, canonical (`cm^2`, `h`), "" when none or not a physical unit."""
    if ans is None:
        return "", "", ""
    s = str(ans)
    if "\\boxed" in s or "\\fbox" in s:
        s = extract_boxed(s, last=True) or s
    s = " ".join(s.split())  # one space per run: from here no pattern can backtrack over spaces
    if len(s) > MAX_ANSWER_CHARS:
        return "", "", ""
    s = re.sub(r"\\[\[\]()]", "", s)  # \( \) \[ \] math delimiters
    s = s.replace("\\$", "").replace("$", "")  # math mode and currency
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\frac\s?(\d)\s?(\d)", r"\\frac{\1}{\2}", s)  # `\\frac23`: TeX reads one digit each
    s = s.replace("{,}", ",").replace(",\\!", ",")  # `1{,}000`, `1,\!000`: a thousands separator
    s = " ".join(_SPACING.sub(" ", s).split())
    s = _over_to_frac(s)
    s = _relations(s)
    s = _thousands(s)
    s = s.replace("\\%", "%").replace("\u2212", "-").replace("\u03c0", "\\pi ")
    s = s.replace("\u221e", "\\infty ").replace("\u00d7", "\\times ").replace("\u221a", "\\sqrt")
    s = re.sub(r"\^\s?\{?\s?\\circ\s?\}?|\\circ|\u00b0|\\degree", "", s)  # degrees
    s = re.sub(r"^\s*[\u20ac\u00a3\u00a5]", "", s)  # other currencies (\$ went above)
    unit = ""
    if units:  # a trailing \text{unit} after a number goes, and plain unit words after a plain number
        m = _TEXT_UNIT_TAIL.search(s)
        if m and not re.search(r"\d", m.group(2)) and not _JOIN.fullmatch(" " + m.group(2).strip() + " "):
            unit = m.group(2) + (m.group(3) or "")
            s = s[:m.start() + 1]
        s, unit = _strip_unit_words(s, unit)
    s = _TEXT_CMD.sub(lambda t: t.group(1), s)  # any other \text{} is unwrapped
    s = s.strip().rstrip(".").strip()
    s = " ".join(_JOIN.sub(",", " " + s + " ").split())  # `3 or 5`, `x=1 and x=2`: a list of answers
    # `x = 5`, `f(x) = 2x`, `x \in [1,2]`: a lone variable on the left names the answer, it is not
    # part of it (so `y = 2x + 3` meets `2x + 3`; `x + y = 1` stays an equation). On the right it
    # names it too: `5 = x` is `x = 5`.
    name = ""
    m = _NAMED.fullmatch(s)
    if m and "=" not in m.group(2):
        name, s = m.group(1), m.group(2)
    elif s.count("=") == 1:
        left, right = s.split("=")
        if left.strip() and left.rstrip()[-1] not in "<>!:" and _NAME_RE.fullmatch(right.strip()):
            name, s = right, left  # (not in `a <= b`)
    name = re.sub(r"[\s{}]", "", name)
    s = re.sub(r"\s+", "", s)
    m = re.fullmatch(r"(\((?:[a-zA-Z],)+[a-zA-Z]\))=(\(.*\))", s)  # `(b, c) = (-3, 0)`
    if m and not name:
        name, s = m.group(1), m.group(2)
    if re.fullmatch(r"\(\w\)", s):  # multiple-choice letter `(C)`
        s = s[1]
    return name, _base_numeral(_strip_braces(s)), _canonical_unit(unit)


def _strip_unit_words(s: str, unit: str = "") -> tuple[str, str]:
    """`1000 dollars` -> `1000`, `5 sq ft` -> `5`: trailing unit words go when a number is left.
    Returns (the rest, the unit removed: `unit` when none was)."""
    words = s.split(" ")
    k = len(words)
    while k > 1 and _UNIT_WORD.fullmatch(words[k - 1]):
        k -= 1
    if k < len(words) and _parse_number("".join(words[:k])) is not None:
        return " ".join(words[:k]), " ".join(words[k:])
    return s, unit


_JOIN = re.compile(r",? (?:and|or|\\lor|\\vee) |;")  # a list of answers in words, or with semicolons
_RELATIONS = [(re.compile(r"\\(?:geqslant|geq|ge|gt)(?![a-zA-Z])|\u2265"), (">=", ">=", ">")),
              (re.compile(r"\\(?:leqslant|leq|le|lt)(?![a-zA-Z])|\u2264"), ("<=", "<=", "<")),
              (re.compile(r"\\(?:neq|ne)(?![a-zA-Z])|\u2260"), ("!=",)),
              (re.compile(r"\\(?:approx|simeq)(?![a-zA-Z])|\u2248"), ("=",))]


def _relations(s: str) -> str:
    """One spelling per relation: `\\geq`, `\\ge`, `\\geqslant`, `≥` -> `>=` (`\\gt` -> `>`); `\\approx`
    is `=` (and a leading `\\approx 3.1` is `3.1`); `\\mid` in set-builder braces is `|`."""
    if "\\" not in s and not re.search("[\u2264\u2265\u2260\u2248]", s):
        return s
    for pat, reps in _RELATIONS:
        s = pat.sub(lambda m: reps[-1] if m.group().endswith(("gt", "lt")) else reps[0], s)
    s = re.sub(r"^\s?=\s?", "", s)
    return re.sub(r"\\mid(?![a-zA-Z])", "|", s)


_THOUSANDS = re.compile(r"((?:[a-zA-Z]\s?=\s?)?[-+]?\s?)([1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?)(?![\d,.])(?=[^,]*$)")


def _thousands(s: str) -> str:
    """`1,000` -> `1000` when the whole answer is that one number (units may follow). A comma with a
    space after it (`40, 200`), or a first group with a leading zero (`0,245`), separates answers."""
    m = _THOUSANDS.match(s)
    return s if not m else m.group(1) + m.group(2).replace(",", "") + s[m.end():]


def _over_to_frac(s: str) -> str:
    """`{a \\over b}` -> `\\frac{a}{b}` (the brace group around \\over, or the whole answer)."""
    for _ in range(20):
        m = re.search(r"\\over(?![a-zA-Z])", s)
        if not m:
            return s
        depth, i = 0, m.start() - 1
        while i >= 0 and not (s[i] == "{" and depth == 0):
            depth += (s[i] == "}") - (s[i] == "{")
            i -= 1
        depth, j = 0, m.end()
        while j < len(s) and not (s[j] == "}" and depth == 0):
            depth += (s[j] == "{") - (s[j] == "}")
            j += 1
        s = s[:i + 1] + "\\frac{" + s[i + 1:m.start()].strip() + "}{" + s[m.end():j].strip() + "}" + s[j:]
    return s


_BASE_WORDS = {w: k for k, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                           "thirteen fourteen fifteen sixteen".split())}


def _base_numeral(s: str) -> str:
    """A numeral in a base, in any spelling (`52_8`, `52_{8}`, `(52)_{(8)}`, `52_{\\text{eight}}`,
    `52(base8)`), as `52_8`; anything else unchanged."""
    m = re.fullmatch(r"\(?([0-9A-Za-z]+)\)?(?:_\{?\(?([0-9]+|[a-z]+)\)?\}?|\(?base([0-9]+|[a-z]+)\)?)", s)
    if not m or not (re.search(r"\d", m.group(1)) or len(m.group(1)) > 1):
        return s
    b = m.group(2) or m.group(3)
    base = int(b) if b.isdigit() else _BASE_WORDS.get(b.lower(), 0)
    digits = m.group(1).upper()
    if not 2 <= base <= 36 or any(int(c, 36) >= base for c in digits):
        return s
    return f"{digits}_{base}"


_UNITS = {  # canonical physical units; a counted noun (`5 apples`) has none
    "m": "m meter meters metre metres", "cm": "cm centimeter centimeters", "mm": "mm millimeter millimeters",
    "km": "km kilometer kilometers", "in": "in inch inches", "ft": "ft foot feet", "yd": "yd yard yards",
    "mi": "mi mile miles", "kg": "kg kilogram kilograms", "g": "g gram grams", "lb": "lb lbs pound pounds",
    "oz": "oz ounce ounces", "l": "l liter liters litre litres", "ml": "ml milliliter milliliters",
    "gal": "gal gallon gallons", "s": "s sec second seconds", "min": "min mins minute minutes",
    "h": "h hr hrs hour hours", "day": "day days", "week": "week weeks", "month": "month months",
    "year": "year years yr yrs", "mph": "mph", "rad": "rad radian radians", "cent": "cent cents",
    "K": "k kelvin", "J": "j joule joules", "W": "w watt watts", "N": "n newton newtons", "Hz": "hz hertz",
    "eV": "ev", "pc": "pc parsec parsecs", "AU": "au", "A": "angstrom angstroms \\aa \\mathrm{a}"}
_UNIT_OF = {w: k for k, ws in _UNITS.items() for w in ws.split()}


def _canonical_unit(u: str) -> str:
    """`\\text{ m}^2`, `square meters`, `sq m` -> `m^2`; "" for no unit or a word that is no physical unit."""
    u = _TEXT_CMD.sub(lambda t: t.group(1), u)
    u = re.sub(r"[{}~\s.]|\\,|\\!", " ", u).lower().split()
    power = ""
    if u and u[0] in ("sq", "square", "cubic"):
        power = "^2" if u[0] != "cubic" else "^3"
        u = u[1:]
    if len(u) != 1:
        return ""
    m = re.fullmatch(r"([a-z\\]+)(\^\d)?", u[0])
    if not m or m.group(1) not in _UNIT_OF:
        return ""
    return _UNIT_OF[m.group(1)] + (m.group(2) or power)


def _parse_number(s: str) -> Optional[tuple[Fraction, bool, bool, int]]:
    """(value, written as a decimal?, a percent?, decimal places) for a plain number in a cleaned
    string: integers, `1,000`, decimals, `4.5e33`, `4.5\\times10^{33}`, `a/b`, `\\frac{a}{b}`,
    `\\frac ab`, mixed `1\\frac{4}{5}`, a trailing `%`; None for anything else, and for strings over
    _MAX_NUMBER_CHARS."""
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    pct = s.endswith("%")
    s = s.rstrip("%")
    sign = -1 if s.startswith("-") else 1
    if s[:1] in ("-", "+"):
        s = s[1:]
    rep = _repeating(s)
    if rep is not None:
        return sign * rep, False, pct, 0
    s = re.sub(r"(?<=\d)(?:\\[lc]?dots|\.\.\.|\u2026)$", "", s)  # `3.14159...`: the decimal as written
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(?:[eE]\{?([-+]?\d+)\}?|(?:\\times|\\cdot|\*)10\^\{?([-+]?\d+)\}?)?", s)
    if m:
        exp = int(m.group(2) or m.group(3) or 0)
        if abs(exp) > 400:  # keep Fraction arithmetic small
            return None
        dec = "." in m.group(1) or m.group(2) is not None or m.group(3) is not None
        places = max(0, len(m.group(1).partition(".")[2]) - exp)
        return sign * Fraction(m.group(1)) * Fraction(10) ** exp, dec, pct, places
    m = (re.fullmatch(r"(\d+)?\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"(\d+)?\\frac(\d)(\d)", s)
         or re.fullmatch(r"()(-?\d+)/(-?\d+)", s) or re.fullmatch(r"()\\frac\{(-?\d+)\}(\d)", s)
         or re.fullmatch(r"()\\frac(\d)\{(-?\d+)\}", s))
    if m and int(m.group(3)) != 0:
        whole = int(m.group(1) or 0)  # `1\frac{4}{5}` is the mixed number 9/5 (MATH's convention)
        return sign * (whole + Fraction(int(m.group(2)), int(m.group(3)))), False, pct, 0
    return None


_REPEAT = re.compile(r"(\d*)\.(\d*)(?:\\(?:overline|bar)\{(\d+)\}|\\(?:overline|bar)(\d)|\\dot\{?(\d)\}?|\((\d+)\)|"
                     r"(\\[lc]?dots|\.\.\.|\u2026))")


def _repeating(s: str) -> Optional[Fraction]:
    """A repeating decimal: `0.\\overline{3}`, `0.\\bar{3}`, `0.1\\overline6`, `0.\\dot{3}`, `0.(3)` and
    `0.33\\ldots` (the shortest period written at least twice at the end) as its exact fraction; None otherwise
    (`3.14159\\ldots` repeats nothing: not a repeating decimal)."""
    m = _REPEAT.fullmatch(s)
    if not m:
        return None
    whole, pre = m.group(1) or "0", m.group(2)
    period = m.group(3) or m.group(4) or m.group(5) or m.group(6)
    if period is None:  # `0.1666...`: find a period written at least twice
        for n in range(1, len(pre) // 2 + 1):
            k = len(pre) - n
            while k - n >= 0 and pre[k - n:k] == pre[k:k + n]:
                k -= n
            if (len(pre) - k) // n >= 2:
                pre, period = pre[:k], pre[k:k + n]
                break
        if period is None:
            return None
    if len(pre) + len(period) > 50:
        return None
    return Fraction(int(whole)) + Fraction(int(pre or "0"), 10 ** len(pre)) + \
        Fraction(int(period), (10 ** len(period) - 1) * 10 ** len(pre))


def normalize_answer(ans: Optional[str]) -> Optional[str]:
    """Canonical string used as the vote key: equal keys mean the same answer. Numbers become the
    exact fraction `p/q`: 0.5, 1/2 and \\dfrac12 all give `1/2`; `50\\%` gives `50` (answers to
    "what percent" usually drop the sign). Other answers: the cleaned, space-free LaTeX.
    String work only (no symbolic algebra), linear time: this runs for every training sample. None (no vote)
    for an empty answer, one over MAX_ANSWER_CHARS, and anything the clean-up cannot read."""
    try:
        s = _clean(ans)
        if not s:
            return None
        num = _parse_number(s)
        if num is not None:
            v = num[0]
            return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"
        return s
    except Exception:  # never expected (a ValueError, a RecursionError): one bad answer must not end training
        return None


# ================================================================================================
# The evaluation checker
# ================================================================================================


def _split_top(s: str, seps: tuple[str, ...] = (",",)) -> list[str]:
    """Split at separators outside any brackets."""
    out, depth, cur, i = [], 0, "", 0
    while i < len(s):
        if s.startswith("\\{", i) or s.startswith("\\}", i):
            depth += 1 if s[i + 1] == "{" else -1
            cur += s[i:i + 2]
            i += 2
            continue
        c = s[i]
        depth += (c in "([{") - (c in ")]}")
        sep = next((p for p in seps if depth == 0 and s.startswith(p, i)), None)
        if sep:
            out.append(cur)
            cur, i = "", i + len(sep)
            continue
        cur += c
        i += 1
    return out + [cur]


def _enclosed(s: str, o: str, c: str) -> bool:
    """s is one bracket pair o...c around the rest (not `(a)+(b)`)."""
    if not (s.startswith(o) and s.endswith(c)) or len(s) < len(o) + len(c):
        return False
    depth = 0
    for ch in s[len(o):-len(c)]:
        depth += (ch in "([{") - (ch in ")]}")
        if depth < 0:
            return False
    return depth == 0


def _structure(s: str) -> tuple[str, list[str]]:
    """(kind, items): 'set' (unordered: `\\{...\\}`, bare `a, b`, unions of intervals), a bracket pair
    like '(]' for tuples, points and intervals (ordered), 'matrix', or 'atom'."""
    m = re.fullmatch(r"[\[(]?\\begin\{([pbvB]?matrix|array)\}(?:\{[lcr|]*\})?(.*?)(?:\\\\)?"
                     r"\\end\{\1\}[\])]?", s)
    if m:
        rows = [r.split("&") for r in m.group(2).replace("\\hline", "").split("\\\\") if r]
        return f"matrix{len(rows)}", [x for r in rows for x in r]
    s = _strip_braces(s)
    if _enclosed(s, "\\langle", "\\rangle"):  # the ordered parts of one answer (see ordered_parts)
        return "ordered", _split_top(s[7:-7])
    if len(_split_top(s, ("\\cup",))) > 1:
        return "set", _split_top(s, ("\\cup",))
    if _enclosed(s, "\\{", "\\}"):
        return "set", [y for x in _split_top(s[2:-2]) for y in _expand_pm(x)]
    items = _split_top(s)
    if len(items) > 1:  # a bare list means a set of answers; `1\pm\sqrt5` stands for two
        return "list", [y for x in items for y in _expand_pm(x)]
    if s[:1] in "([" and s[-1:] in ")]" and _enclosed("(" + s[1:-1] + ")", "(", ")"):
        inner = _split_top(s[1:-1])
        if len(inner) > 1:
            return s[0] + s[-1], inner
    if "\\pm" in s and len(_expand_pm(s)) == 2:
        return "set", _expand_pm(s)
    return "atom", [s]


def _strip_braces(s: str) -> str:
    """`{{x}}` -> `x`: TeX grouping braces around the whole answer, any depth, in one pass."""
    match, stack = {}, []
    for i, c in enumerate(s):
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            match[stack.pop()] = i
    k = 0
    while k < len(s) // 2 and s[k] == "{" and match.get(k) == len(s) - 1 - k:
        k += 1
    return s[k:len(s) - k]


def _expand_pm(s: str) -> list[str]:
    parts = s.split("\\pm")
    if len(parts) != 2:
        return [s]
    a, b = parts
    return [f"{a}+{b}", f"{a}-{b}"] if a else [b, f"-{b}"]


class _Timeout(BaseException):
    """Raised by the alarm. A BaseException, so that sympy's many `except Exception` clauses cannot
    swallow it and compute on past the budget."""


def _run_with_budget(fn, seconds: float):
    """fn() or _Timeout after `seconds`. SIGALRM in the main thread (interrupts pure-Python sympy;
    it re-fires every 50 ms after the first, in case a bare `except:` swallowed one); elsewhere fn
    runs in a daemon thread that is abandoned on timeout. fn's own exceptions propagate."""
    import signal
    import threading
    seconds = seconds if seconds > 1e-3 else 1e-3  # 0 would disarm the timer (and NaN fails this too)
    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        armed = [True]

        def on_alarm(signum, frame):
            if armed[0]:
                raise _Timeout()
        old = signal.signal(signal.SIGALRM, on_alarm)
        old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
        start = time.monotonic()
        try:
            return fn()
        finally:
            while True:  # an alarm landing before `armed` is cleared must not skip the clean-up
                try:
                    armed[0] = False  # from here on an alarm is ignored
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    signal.signal(signal.SIGALRM, old)
                    break
                except _Timeout:
                    continue
            if old_delay:  # someone else's alarm (e.g. a test timeout) was pending: re-arm it
                left = max(1e-3, old_delay - (time.monotonic() - start))
                signal.setitimer(signal.ITIMER_REAL, left, old_interval)
    box: list = []

    def run():
        try:
            box.append((True, fn()))
        except BaseException as e:  # noqa: BLE001  (handed to the caller below)
            box.append((False, e))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if not box:
        raise _Timeout()
    ok, value = box[0]
    if not ok:
        raise value
    return value


def answers_equal(pred: Optional[str], gold: Optional[str], *, timeout: float = 5.0) -> bool:
    """Full checker used by eval.py: is the predicted answer the gold one? Understands numbers in
    their usual spellings, units and text, tuples/intervals (ordered), sets and bare lists
    (unordered), matrices, named answers and equations, and symbolic expressions (sympy). The whole
    comparison, clean-up included, runs under a budget of `timeout` seconds; it never raises: an
    answer it cannot read, or cannot decide in time, is unequal."""
    if pred is None or gold is None:
        return False
    try:
        pred, gold = str(pred), str(gold)
        if len(pred) + len(gold) <= 1000:  # cache short pairs only: at most ~64 MB of keys
            return _equal_budgeted_cached(pred, gold, float(timeout))
        return _equal_budgeted(pred, gold, float(timeout))
    except Exception:  # not expected; whatever it is, a bad sample is scored unequal
        return False


def _equal_budgeted(pred: str, gold: str, timeout: float) -> bool:
    import sympy  # noqa: F401  (imported outside the budget: the first import takes a second)
    import sympy.tensor.tensor  # noqa: F401  (sympy's Add imports it on first use: a second more, once)
    try:
        return _run_with_budget(lambda: _compare(pred, gold), timeout)
    except _Timeout:
        return False


_equal_budgeted_cached = functools.lru_cache(maxsize=65536)(_equal_budgeted)  # samples repeat answers


def _compare(pred: str, gold: str, approx: bool = True) -> bool:
    if _compare_as_written(pred, gold):
        return True
    if not approx:
        return False
    try:
        for x, other in ((pred, gold), (gold, pred)):  # `\\frac{\\sqrt3}{2} \\approx 0.866`: the value or its decimal
            sides = _approx_sides(x)
            if sides and (_compare(sides[0], other, False) or _compare(sides[1], other, False)):
                return True
    except Exception:
        pass
    return False


_APPROX = re.compile(r"\\approx(?![a-zA-Z])|\u2248")


def _approx_sides(s: str) -> Optional[tuple[str, str]]:
    """(A, B) for an answer `A \\approx B` (a name before A may stand: `x = A \\approx B`) whose two sides
    are close numbers (within 1%, or one unit of B's last decimal place): a value and its rounding."""
    parts = _APPROX.split(s)
    if len(parts) != 2 or len(s) > 200:
        return None
    a, b = parts[0].rsplit("=", 1)[-1].strip(" $"), parts[1].strip(" $")
    x, y = _clean(a), _clean(b)
    if not x or not y or _parse_number(y) is None:
        return None
    try:
        va, vb = _to_sympy(x), float(_parse_number(y)[0])
        va = complex(va.evalf(20)) if va is not None and not _unknowns(va) else None
    except Exception:
        return None
    if va is None or abs(va - vb) > max(0.01 * abs(vb), 10.0 ** -_parse_number(y)[3]):
        return None
    return a, b


def _compare_as_written(pred: str, gold: str) -> bool:
    try:
        (pn, p, pu), (gn, g, gu) = _clean_unit(pred), _clean_unit(gold)
        if not p or not g:  # empty, or over MAX_ANSWER_CHARS: then only the same text is equal
            p, g = " ".join(pred.split()), " ".join(gold.split())
            return len(p) > MAX_ANSWER_CHARS and p == g
        if pu and gu and pu != gu:  # `15 m^2` is not `15 cm^2`, nor 90 minutes 1.5 hours: no conversion
            return False
        if _equal_named(pn, p, gn, g):
            return True
        # units kept, as written: `\\frac{37}{4} m` and `\\frac{37}{4}m` (a product with m) then meet
        (pn2, p2), (gn2, g2) = _clean_parts(pred, units=False), _clean_parts(gold, units=False)
        return (p2, g2) != (p, g) and _equal_named(pn2, p2, gn2, g2)
    except Exception:  # a reading we did not foresee (RecursionError included): unequal, never a crash
        return False


def _equal_named(pn: str, p: str, gn: str, g: str, depth: int = 0) -> bool:
    """Names (`x` of `x = 5`) are dropped when they agree or only one side has one; when they
    differ, or one side is a named value and the other an equation, whole equations are compared:
    `x = y` is `y = x`, `y_2 = x` is not `y_3 = x`, `c = a + b` is `a + b - c = 0`."""
    if pn[:1] == "(" and not gn and _structure(g)[0] in ("list", "ordered"):  # `(b,c) = (-3,0)` against `-3, 0`
        pn, p = "", ",".join(f"{n}={v}" for n, v in zip(pn[1:-1].split(","), _split_top(p[1:-1])))
    if gn[:1] == "(" and not pn and _structure(p)[0] in ("list", "ordered"):
        gn, g = "", ",".join(f"{n}={v}" for n, v in zip(gn[1:-1].split(","), _split_top(g[1:-1])))
    if (pn and gn and pn != gn) or (pn and not gn and _EQ.search(g) and not _all_named(g, pn)) or \
            (gn and not pn and _EQ.search(p) and not _all_named(p, gn)):
        p, g = (f"{pn}={p}" if pn else p), (f"{gn}={g}" if gn else g)
    return p == g or _equal(p, g, depth)


_EQ = re.compile(r"(?<![<>!])=")  # an equation's `=`, not `<=`


def _all_named(s: str, name: str) -> bool:
    """s is a list whose items all carry this name: `x=2,x=3` against `x \\in \\{2,3\\}`."""
    items = _split_top(s)
    return len(items) > 1 and all(_clean_parts(x)[0] == name for x in items)
_MAX_DEPTH = 8  # tuples of tuples of ...: deeper nesting is not a final answer


def _equal(p: str, g: str, depth: int = 0) -> bool:
    if p == g:
        return True
    if depth > _MAX_DEPTH:
        return False
    a, b = _parse_number(p), _parse_number(g)  # before structure: `1,000` is a number, not a list
    if a is not None and b is not None:
        return _numbers_equal(a, b)
    pb, gb = re.fullmatch(r"([0-9A-Z]+)(?:_(\d+))?", p), re.fullmatch(r"([0-9A-Z]+)(?:_(\d+))?", g)
    if pb and gb and (pb.group(2) or gb.group(2)):  # numerals in a base: one base may be left implied
        return pb.group(1) == gb.group(1) and (pb.group(2) == gb.group(2) or not (pb.group(2) and gb.group(2)))
    p, g = _as_intervals(p), _as_intervals(g)
    if p == g:
        return True
    (pk, pi), (gk, gi) = _structure(p), _structure(g)
    if pk == "atom" and gk == "atom":
        return _atom_equal(pi[0], gi[0])
    if len(pi) != len(gi):
        return False
    ordered = {pk, gk} <= {"ordered", "list", "()"} and "ordered" in (pk, gk)
    if {pk, gk} & {f"matrix{len(pi)}"} and {pk, gk} & {"()", "ordered"}:
        ordered = True  # a column vector against the tuple `(1, 2, 3)` or `\\langle 1, 2, 3 \\rangle`
    if not ordered and {pk, gk} <= {"list", "()"} and "list" in (pk, gk):  # `b = 0, c = -3` against `-3, 0`
        pn, gn = [_clean_parts(x)[0] for x in pi], [_clean_parts(x)[0] for x in gi]
        ordered = any((all(n) and len(set(n)) == len(n) and not any(m)) for n, m in ((pn, gn), (gn, pn)))
        ordered = ordered and (pk == gk or (pk == "list" and all(pn)) or (gk == "list" and all(gn)))
    if ordered and all(_EQ.search(x) for x in pi + gi):
        ordered, pk, gk = False, "set", "set"  # every part carries its name (`\\angle B = 90`): the names order them
    if ordered:
        return all(_equal_named(*_clean_parts(a), *_clean_parts(b), depth + 1) for a, b in zip(pi, gi))
    if {pk, gk} == {"set", "list"}:
        pk = gk = "set"
    if pk != gk:
        return False
    # items keep their names: `C_1 = 2, C_2 = 3` is not `C_1 = 2, C_3 = 3`
    if gk not in ("set", "list"):  # ordered: tuples, points, intervals, matrices
        return all(_equal_named(*_clean_parts(a), *_clean_parts(b), depth + 1) for a, b in zip(pi, gi))
    left = [_clean_parts(b) for b in gi]  # unordered: match each predicted item to a distinct gold item
    for a in map(_clean_parts, pi):
        j = next((j for j, b in enumerate(left) if _equal_named(*a, *b, depth + 1)), None)
        if j is None:
            return False
        left.pop(j)
    return True


def ordered_parts(parts: list[str]) -> str:
    """One gold answer made of parts in a fixed order (`find b and c`): `\\langle b, c \\rangle`, which
    the checker compares part by part, in order, with a bare list, a tuple or the same form. A part
    may hold several (`-3,0`); a single part with no comma is returned as it is."""
    items = [x.strip() for p in parts for x in _split_top(" ".join(str(p).replace("$", " ").split()))]
    if len(items) < 2:
        return ", ".join(parts)
    return "\\langle " + ", ".join(items) + " \\rangle"


_INEQ = re.compile(r"(?:(.+?)(<=|<|>=|>))?([a-zA-Z])(<=|<|>=|>)(.+)|(.+?)(<=|<|>=|>)([a-zA-Z])")


def _as_intervals(s: str) -> str:
    """An inequality in one variable as its interval: `x>=3` and `3<=x` -> `[3,\\infty)`, `-1<x<=2` ->
    `(-1,2]`; a list of them (`x<2` or `x>5`) -> their union with \\cup (two one-sided ones that overlap,
    `x>1` and `x<3`, -> their intersection); a set-builder `\\{x|x>=3\\}` the same. Else s unchanged."""
    if "<" not in s and ">" not in s:
        return s
    s = s.replace("\\bigcup", "\\cup")
    halves = _split_top(s, (":",))
    if len(halves) == 2 and not halves[0].startswith("\\{"):  # `x<-7:(-\\infty,-7)`: the answer both ways
        left = _as_intervals(halves[0])
        return left if left != halves[0] else s
    m = re.fullmatch(r"\\\{([a-zA-Z])(?:\\in\\mathbb\{?R\}?)?[|:](.*)\\\}", s)
    if m:
        s = m.group(2)
    parts, var = [], None
    for item in _split_top(s):
        m = _INEQ.fullmatch(item)
        if not m:
            return s
        if m.group(3):
            v, lo_op, lo, hi_op, hi = m.group(3), m.group(2), m.group(1), m.group(4), m.group(5)
            if lo is None and hi_op[0] == ">":  # x > b
                lo_op, lo, hi_op, hi = hi_op.replace(">", "<"), hi, None, None
            elif lo is None:  # x < b
                pass
            elif lo_op[0] != hi_op[0]:
                return s
            elif lo_op[0] == ">":  # 5 > x > 1: read from the other end
                lo_op, lo, hi_op, hi = hi_op.replace(">", "<"), hi, lo_op.replace(">", "<"), lo
        else:  # b op x
            v, op, b = m.group(8), m.group(7), m.group(6)
            lo_op, lo, hi_op, hi = ((op, b, None, None) if op[0] == "<" else (None, None, op.replace(">", "<"), b))
        if var not in (None, v) or any(x is not None and v in re.sub(r"\\[a-zA-Z]+", "", x) for x in (lo, hi)):
            return s
        var = v
        parts.append(("[" if lo_op == "<=" else "(") + (lo if lo is not None else "-\\infty") + "," +
                      (hi if hi is not None else "\\infty") + ("]" if hi_op == "<=" else ")"))
    if len(parts) == 2 and parts[0].endswith("\\infty)") != parts[1].endswith("\\infty)") and \
            parts[0].startswith("(-\\infty") != parts[1].startswith("(-\\infty"):
        one, two = sorted(parts, key=lambda x: not x.endswith("\\infty)"))  # lower bound first
        lo, hi = _parse_number(one[1:].split(",")[0]), _parse_number(two[:-1].split(",")[1])
        if lo is not None and hi is not None and lo[0] < hi[0]:  # they overlap: `x>1 and x<3`
            return one[0] + one[1:].split(",")[0] + "," + two[:-1].split(",")[1] + two[-1]
    return "\\cup".join(parts)


def _atom_equal(p: str, g: str) -> bool:
    if re.fullmatch(r"[a-zA-Z]{2,}", p) and re.fullmatch(r"[a-zA-Z]{2,}", g):
        return p.lower() == g.lower()  # words: `Yes` / `yes`
    if p.count("=") == 1 and g.count("=") == 1:
        (pl, pr), (gl, gr) = p.split("="), g.split("=")
        if pl == gl:
            return _atom_equal(pr, gr)
        return _equations_equal(pl, pr, gl, gr)
    if "=" in p or "=" in g:
        return False
    return _sympy_equal(p, g)


def _numbers_equal(a: tuple[Fraction, bool, bool, int], b: tuple[Fraction, bool, bool, int]) -> bool:
    """Exact values must match, except that a decimal may be a rounding of a value it cannot write
    in as many places (0.333333 for 1/3, 0.035156 for 9/256): then, as math-verify does, both are
    compared rounded to 6 places. 0.5 vs 0.05 or 1.0000001 vs 1 stay different numbers."""
    # 50% against a plain number may mean 50, or 0.5 (a proportion: at most 1 in size); two percents
    # are compared as written (`0.625%` is not `62.5%`), and `1000%` is not 10
    xs = [a[0]] + ([a[0] / 100] if a[2] and not b[2] and abs(b[0]) <= 1 else [])
    ys = [b[0]] + ([b[0] / 100] if b[2] and not a[2] and abs(a[0]) <= 1 else [])
    for x in xs:
        for y in ys:
            if x == y:
                return True
            rounded = (a[1] and not b[1] and (y * 10 ** a[3]).denominator != 1) or \
                      (b[1] and not a[1] and (x * 10 ** b[3]).denominator != 1)
            if rounded and round(x, 6) == round(y, 6):
                return True
    return False


_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh",
          "tanh", "ln", "log", "exp", "sqrt"}
_CONSTS = {"pi": "pi", "infty": "oo", "infinity": "oo"}
_GREEK = set("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi "
             "rho varrho sigma varsigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi "
             "Sigma Upsilon Phi Psi Omega".split())  # symbols like x (\pi is the constant)
# One token at a time, no repetition of overlapping pieces: linear. Commands are matched as
# prefixes, longest first, because the clean-up removed the spaces (`\sin x` is `\sinx` here).
_LATEX_TOKEN = re.compile(r"\\(?:" + "|".join(sorted(_FUNCS | set(_CONSTS) | _GREEK | {
    "frac", "binom", "cdot", "times", "div", "lfloor", "rfloor", "lceil", "rceil", "{", "}"},
    key=len, reverse=True)) + r")|\d+(?:\.\d*)?|\.\d+|[a-zA-Z]|[-+*/^_()\[\]{}!|]")
_MAX_SYMPY_CHARS = 400  # not a short answer: parsing alone could eat the budget
_MAX_EXPONENT = 10 ** 4  # numeric exponents and factorials beyond this are refused (see _small)
_MAX_BITS = 10 ** 6  # exact numbers any step may build: a product of two takes milliseconds
_MAX_FACTORIAL = 2000  # n! for a larger n is refused (a function of it would be exact work on ~20,000 bits)
_MAX_FUNCTION_BITS = 2048  # the largest exact number a function (floor, sqrt, log, x^y, ...) may be applied to
_MAX_NESTING = 24  # deeper expression trees are refused


def _is_letter(t: str) -> bool:
    """A token that names a variable: a Latin letter (not e or i, the constants) or a Greek one."""
    return (len(t) == 1 and t.isalpha() and t not in "ei") or t[1:] in _GREEK


def _function_letters(*strings: str) -> frozenset:
    """The letters read as functions, decided over all the strings being compared together: a
    letter is a function when every one of its occurrences, in all of them, is followed by `(`
    (`I(0) e^{-t/RC}`, `f(x)`, `P(1+r)^n`). If it appears anywhere as a plain variable it is one
    everywhere, and `a(b+c)` is a product (so it equals `ab+ac`; `x(x+1)` is one too). Reading both
    answers the same way is what matters: `I(0)` then never equals `0` or `g(0)`."""
    seen, plain = set(), set()
    for s in strings:
        toks = _LATEX_TOKEN.findall(s)
        for k, t in enumerate(toks):
            if _is_letter(t):
                seen.add(t)
                if toks[k + 1:k + 2] != ["("]:
                    plain.add(t)
    return frozenset(seen - plain)


def _latex_to_code(s: str, funcs: frozenset = frozenset()) -> Optional[str]:
    """A small LaTeX -> Python-expression translation for sympy. Only whitelisted tokens get through
    (the result is eval'd by sympy's parser), so anything unusual yields None. Variables become
    `v_<name>`, letters in `funcs` applied to `(...)` become calls `F_<name>(...)`."""
    toks = _LATEX_TOKEN.findall(s)
    if "".join(toks) != s:
        return None
    pos = 0

    def group() -> str:  # a {...} group or a single token, as code
        nonlocal pos
        if pos < len(toks) and toks[pos] == "{":
            depth, start = 0, pos
            while pos < len(toks):
                depth += (toks[pos] == "{") - (toks[pos] == "}")
                pos += 1
                if depth == 0:
                    return "(" + seq(toks[start + 1:pos - 1]) + ")"
            raise ValueError("unbalanced")
        if pos >= len(toks):
            raise ValueError("missing argument")
        pos += 1
        return seq([toks[pos - 1]])

    def seq(ts: list[str]) -> str:
        nonlocal toks, pos
        saved, toks, pos = (toks, pos), ts, 0
        out, prev_operand, abs_open = [], False, False
        while pos < len(toks):
            t = toks[pos]
            pos += 1
            if t == "\\frac":
                piece = f"(({group()})/({group()}))"
            elif t == "\\binom":
                piece = f"binomial({group()},{group()})"
            elif t == "\\sqrt" and toks[pos:pos + 1] == ["["]:  # \sqrt[n]{x}
                end = _match_paren(toks, pos)
                n = seq_sub(pos + 1, end)
                pos = end + 1
                piece = f"(({group()})**(1/({n})))"
            elif t == "\\sqrt":
                piece = f"sqrt({group()})"
            elif t in ("\\lfloor", "\\lceil"):
                close = "\\rfloor" if t == "\\lfloor" else "\\rceil"
                end = toks.index(close, pos)
                piece = ("floor(" if t == "\\lfloor" else "ceiling(") + seq_sub(pos, end) + ")"
                pos = end + 1
            elif t[1:] in _FUNCS:
                name = {"ln": "log", "arcsin": "asin", "arccos": "acos", "arctan": "atan"}.get(t[1:], t[1:])
                base = ""
                if t == "\\log" and toks[pos:pos + 1] == ["_"]:  # \log_2 8, \log_{b}(x)
                    pos += 1
                    if pos < len(toks) and toks[pos][0].isdigit() and len(toks[pos]) > 1:
                        base = toks[pos][0]  # `\log_28` (spaces are gone): TeX's subscript is one character
                        toks = toks[:pos] + [toks[pos][0], toks[pos][1:]] + toks[pos + 1:]
                        pos += 1
                    else:
                        base = group()
                    base = "," + base
                power = ""
                if toks[pos:pos + 1] == ["^"]:  # \sin^2 x
                    pos += 1
                    power = "**" + group()
                if toks[pos:pos + 1] == ["("]:
                    end = _match_paren(toks, pos)
                    arg = seq_sub(pos + 1, end)
                    pos = end + 1
                else:  # \sin x, \cos 4t: the argument runs to the next + - ) or (after one token) function
                    end = pos
                    while end < len(toks) and toks[end] not in "+-=)" and (
                            end == pos or toks[end][1:] not in _FUNCS):
                        end += 1
                    arg = seq_sub(pos, end)
                    pos = end
                piece = f"({name}({arg}{base}){power})"
            elif t[1:] in _CONSTS:
                piece = _CONSTS[t[1:]]
            elif t in ("\\cdot", "\\times", "*"):
                out.append("*")
                prev_operand = False
                continue
            elif t in ("\\div", "/"):
                out.append("/")
                prev_operand = False
                continue
            elif t in "+-":
                out.append(t)
                prev_operand = False
                continue
            elif t == "^":
                out.append("**" + group())
                prev_operand = True
                continue
            elif t == "!":  # n! on the piece before it, as sympy's factorial notation reads it (`2^3!` is 2^(3!))
                if not out or out[-1] in "+-*/":
                    raise ValueError("factorial of nothing")
                last = out[-1]
                out[-1] = "**factorial(" + last[2:] + ")" if last.startswith("**") else "factorial(" + last + ")"
                continue
            elif t == "_":
                if not out or not out[-1].startswith("v_"):
                    raise ValueError("subscript")
                sub = group().strip("()")
                if not re.fullmatch(r"\w+", sub):
                    raise ValueError("subscript")
                out[-1] += "_" + sub
                continue
            elif t == "|":
                if abs_open:
                    out.append(")")
                    abs_open, prev_operand = False, True
                    continue
                piece, abs_open = "Abs(", True
                if prev_operand:
                    out.append("*")
                out.append(piece)
                prev_operand = False
                continue
            elif t in funcs and toks[pos:pos + 1] == ["("]:  # I(0), f(x): a call, not a product
                end = _match_paren(toks, pos)
                piece = f"F_{t.lstrip(chr(92))}({seq_sub(pos + 1, end)})"
                pos = end + 1
            elif t in ("(", "[", "{"):
                end = _match_paren(toks, pos - 1)
                piece = "(" + seq_sub(pos, end) + ")"
                pos = end + 1
            elif t[0].isdigit() or t[0] == ".":
                piece = t
            elif t.isalpha():
                piece = {"e": "E", "i": "I"}.get(t, "v_" + t)
            elif t[1:] in _GREEK:
                piece = "v_" + t[1:]
            else:
                raise ValueError(f"token {t}")
            if prev_operand:
                out.append("*")
            out.append(piece)
            prev_operand = True
        toks, pos = saved
        return "".join(out)

    def seq_sub(a: int, b: int) -> str:
        return seq(toks[a:b])

    try:
        return seq(toks)
    except (ValueError, IndexError):
        return None


def _match_paren(toks: list[str], i: int) -> int:
    depth = 0
    for j in range(i, len(toks)):
        depth += (toks[j] in ("(", "[", "{")) - (toks[j] in (")", "]", "}"))
        if depth == 0:
            return j
    raise ValueError("unbalanced")


def _unknowns(e) -> set:
    """Free symbols and applied unknown functions (`I(0)` has no free symbol but is not a number)."""
    from sympy.core.function import AppliedUndef
    return set(e.free_symbols) | set(e.atoms(AppliedUndef))


def _small(e) -> bool:
    """No exact arithmetic that could run for minutes inside C (big integers), where the alarm
    cannot reach it: on the unevaluated tree, the exact numbers sympy may build stay under
    _MAX_BITS, and a numeric exponent or factorial argument under _MAX_EXPONENT. `9^{9^{9}}`,
    `((10^4)^{10^4})^{10^4}` and `(10^7)!` are refused without being computed; `e^{x^2}` and
    `2^{2019}` pass."""
    return _bits(e) <= _MAX_BITS


def _bits(e, depth: int = 0) -> float:
    """An upper bound on the size in bits of the exact numbers evaluating e builds (inf: too big)."""
    import math
    import sympy
    if depth > _MAX_NESTING:  # `\\sqrt{\\sqrt{\\sqrt{...}}}` forty deep: no answer, and slow to evaluate
        return math.inf
    if e.is_Rational:
        return e.p.bit_length() + e.q.bit_length()
    if e.is_Function and not isinstance(e, (sympy.factorial, sympy.binomial)):
        inner = [_bits(a, depth + 1) for a in e.args]
        # floor, log, sin ... of a huge exact number: sympy factors or expands it exactly, in C
        return math.inf if max(inner, default=0) > _MAX_FUNCTION_BITS else sum(inner)
    if e.is_Pow or isinstance(e, (sympy.factorial, sympy.binomial)):
        inner = sum(_bits(a, depth + 1) for a in e.args)
        if inner > _MAX_BITS:
            return math.inf
        x = e.args[1] if e.is_Pow else e.args[0]
        if e.is_Pow and not x.is_Integer and _bits(e.args[0], depth + 1) > _MAX_FUNCTION_BITS:
            return math.inf  # a root or symbolic power of a huge number: sympy tries to factor it
        if _unknowns(x):
            if not e.is_Pow and x.has(sympy.factorial, sympy.binomial):
                return math.inf  # `((15 m^2)!)!`: the probe points would need factorials of factorials
            return inner
        v = abs(complex(sympy.N(x, 15)))
        if not v <= (_MAX_EXPONENT if e.is_Pow else _MAX_FACTORIAL):  # also catches nan
            return math.inf
        if e.is_Pow:
            return inner + _bits(e.args[0], depth + 1) * max(1.0, v)
        return inner + v * max(1.0, math.log2(max(v, 1.0)))  # n! has about n log2 n bits
    return sum(_bits(a, depth + 1) for a in e.args)


_SMALL_FUNCS = {"floor", "ceiling", "sqrt", "log", "exp", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos",
                "atan", "sinh", "cosh", "tanh", "Abs"}


def _magnitude(code: str) -> float:
    """An upper bound on the bits of the exact numbers evaluating `code` (the translation's Python
    expression) may build, read from its syntax tree before sympy sees it: inf for a numeric power
    over _MAX_EXPONENT, a factorial over _MAX_FACTORIAL, a function, root or symbolic power of a
    number over _MAX_FUNCTION_BITS, a factorial of a factorial of unknowns, or nesting over _MAX_NESTING."""
    import ast
    import math
    inf = math.inf

    def value(node):  # the exact value of a small numeric subtree, else None
        try:
            v = eval(compile(ast.Expression(node), "<n>", "eval"), {"__builtins__": {}}, {})
            return v if isinstance(v, (int, float)) and abs(v) < 1e15 else None
        except Exception:
            return None

    def walk(node, depth: int) -> tuple[float, bool, bool]:
        """(bits, has unknowns, has a factorial)"""
        if depth > _MAX_NESTING:
            return inf, False, False
        if isinstance(node, ast.Constant):
            v = node.value
            return (abs(v).bit_length() if isinstance(v, int) else 64.0), False, False
        if isinstance(node, ast.Name):
            return 2.0, node.id.startswith("v_"), False
        if isinstance(node, ast.UnaryOp):
            return walk(node.operand, depth + 1)
        if isinstance(node, ast.BinOp):
            (a, ua, fa), (b, ub, fb) = walk(node.left, depth + 1), walk(node.right, depth + 1)
            if not isinstance(node.op, ast.Pow):
                return a + b + 1, ua or ub, fa or fb
            e = value(node.right) if b <= 64 and not ub else None
            if ub and fb:  # `m^{2^{(15m)!}}`: an exponent that grows like a factorial at the probe points
                return inf, True, True
            if ub or e is None or e != int(e):  # a symbolic or fractional power: a root of the base at most
                return (inf if a > _MAX_FUNCTION_BITS or b > _MAX_FUNCTION_BITS else a + b), ua or ub, fa or fb
            if abs(e) > _MAX_EXPONENT:
                return (a if a <= 1 and not ua else inf), ua, fa or fb
            return a * max(1.0, abs(e)) + b, ua, fa or fb
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            args = [walk(x, depth + 1) for x in node.args]
            bits = sum(x[0] for x in args)
            unknown, fact = any(x[1] for x in args), any(x[2] for x in args)
            name = node.func.id
            if name == "factorial":
                n = value(node.args[0]) if not unknown and args[0][0] <= 64 else None
                if unknown:  # (n+1)!, not (n + 10^{17})! or (x^{10^{30}})!: probe points would need huge gammas
                    return (inf if fact or bits > 32 else bits), True, True
                if n is None or n > _MAX_FACTORIAL:
                    return inf, False, True
                return n * max(1.0, math.log2(max(n, 1))), False, True
            if name == "binomial":
                n = value(node.args[0]) if not unknown and args[0][0] <= 64 else None
                if len(args) == 2 and not args[1][1]:  # binomial(x, k) for a number k is a product of k terms
                    k = value(node.args[1]) if args[1][0] <= 64 else None
                    if k is None or abs(k) > _MAX_FACTORIAL:
                        return inf, unknown, fact
                if unknown:
                    return (inf if fact or bits > 64 else bits), True, fact
                return (inf if n is None or n > _MAX_BITS else max(bits, n)), False, fact
            if name in _SMALL_FUNCS or name.startswith("F_"):
                return (inf if bits > _MAX_FUNCTION_BITS else bits), unknown, fact
            return bits, unknown, fact
        return inf, False, False  # nothing else comes out of the translation

    try:
        return walk(ast.parse(code, mode="eval").body, 0)[0]
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return inf


def _to_sympy(s: str, funcs: frozenset = frozenset()):
    import sympy
    from sympy.parsing.sympy_parser import parse_expr, rationalize, standard_transformations
    code = _latex_to_code(s, funcs)
    if code is None:
        return None
    if _magnitude(code) > _MAX_BITS:
        return None  # sympy evaluates some of it even when asked not to: refused before it starts
    names = {n: sympy.Symbol(n[2:]) for n in re.findall(r"\bv_\w+", code)}
    names.update({n: sympy.Function(n[2:]) for n in re.findall(r"\bF_\w+", code)})
    kw = dict(local_dict=names, transformations=standard_transformations + (rationalize,))
    if not _small(parse_expr(code, evaluate=False, **kw)):
        return None
    return parse_expr(code, **kw)


def _probe(e, syms: list, t: int) -> Optional[complex]:
    """e at the t-th fixed point (positive, irregular values for the symbols), or None when that is
    not a finite number (an unknown function, a pole)."""
    import sympy
    point = {s: sympy.Rational(1000 + 263 * j + 389 * t, 1373) for j, s in enumerate(syms)}
    v = e.evalf(30, subs=point)
    if not v.is_number:
        return None
    c = complex(v)
    return c if cmath.isfinite(c) else None


def _differ_somewhere(a, b) -> bool:
    """True when a and b take clearly different values at one of three fixed points: most unequal
    answers are settled here in milliseconds, before sympy.simplify (which can grind for seconds).
    Never decides equality: values that agree go on to simplify."""
    syms = sorted(set(a.free_symbols) | set(b.free_symbols), key=str)
    for t in range(3):
        x, y = _probe(a, syms, t), _probe(b, syms, t)
        if x is not None and y is not None and abs(x - y) > 1e-9 * max(1.0, abs(x), abs(y)):
            return True
    return False


def _sympy_equal(p: str, g: str) -> bool:
    """Symbolic equality; constants are also compared numerically at high precision."""
    import sympy
    if max(len(p), len(g)) > _MAX_SYMPY_CHARS:
        return False
    try:
        funcs = _function_letters(p, g)
        a, b = _to_sympy(p, funcs), _to_sympy(g, funcs)
        if a is None or b is None:
            return False
        if not _unknowns(a) and not _unknowns(b):
            if a.is_Rational and b.is_Rational:
                return a == b  # exact: 2**100 + 1 is not 2**100
            x, y = sympy.N(a, 50), sympy.N(b, 50)
            if not (x.is_number and y.is_number) or not (x.is_finite and y.is_finite):
                return x == y  # oo, -oo, zoo: only themselves
            if "." in p or "." in g:  # a decimal stands for a rounded value: math-verify's 6 places
                cx, cy = complex(x), complex(y)
                return all(round(u, 6) == round(v, 6) for u, v in ((cx.real, cy.real), (cx.imag, cy.imag)))
            return bool(abs(x - y) <= 1e-40 * max(1, abs(y)))
        if max(_bits(a), _bits(b)) > _MAX_FUNCTION_BITS:
            return False  # a huge exact number against an expression: simplify would grind on it
        if _differ_somewhere(a, b):
            return False
        d = sympy.simplify(a - b)
        return bool(d == 0 or d.is_zero)
    except Exception:  # sympy raises many things on odd input (the budget's _Timeout is no Exception)
        return False


def _equations_equal(pl: str, pr: str, gl: str, gr: str) -> bool:
    """`pl = pr` against `gl = gr`. With unknowns in both, the same equation up to a nonzero constant
    factor (`5x - 7y = -4` is `10x - 14y + 8 = 0`). With none in either (`1 = 2`,
    `\\log\\frac{1}{1000} = -3`) it is a statement about numbers, and a factor would make any two
    false (or any two true) ones equal: then the same two sides, in either order, each compared as a
    value. One with unknowns and one without are different."""
    import sympy
    if max(len(pl) + len(pr), len(gl) + len(gr)) > _MAX_SYMPY_CHARS:
        return False
    try:
        funcs = _function_letters(pl, pr, gl, gr)
        sides = [_to_sympy(x, funcs) for x in (pl, pr, gl, gr)]
        if any(x is None for x in sides):
            return False
        da, db = sides[0] - sides[1], sides[2] - sides[3]
        if not _unknowns(da) or not _unknowns(db):
            if _unknowns(da) or _unknowns(db):
                return False
            return (_equal(pl, gl) and _equal(pr, gr)) or (_equal(pl, gr) and _equal(pr, gl))
        syms = sorted(set(da.free_symbols) | set(db.free_symbols), key=str)
        ratios = []  # of the two sides' differences at fixed points: a constant for one equation
        for t in range(3):
            vals = [_probe(x, syms, t) for x in sides]
            if any(v is None for v in vals):
                continue
            scale = max(1.0, *map(abs, vals))
            x, y = vals[0] - vals[1], vals[2] - vals[3]
            zero_x, zero_y = abs(x) <= 1e-12 * scale, abs(y) <= 1e-12 * scale
            if zero_x != zero_y:
                return False  # one holds here and the other does not
            if not zero_x:
                ratios.append(x / y)
        if any(abs(x - ratios[0]) > 1e-9 * max(1.0, abs(x)) for x in ratios):
            return False  # the ratio is not a constant: different equations
        r = sympy.simplify(da / db)
        return bool(not _unknowns(r) and r.is_number and r != 0)
    except Exception:
        return False
