"""Tests of the answer checker (checker.py) and of the answer section of opensir.py: extraction
(the last \\boxed{}), the training vote key, and the evaluation checker. Degenerate inputs run in a
subprocess under a hard timeout, so a hang fails the test instead of stalling the suite."""
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

import checker
import eval as ev
import opensir as O
from checker import answers_equal
from checker import extract_boxed, final_answer, normalize_answer

HERE = os.path.dirname(os.path.abspath(__file__))

# ------------------------------------------------------------------------------------------------
# Extraction and the vote key
# ------------------------------------------------------------------------------------------------


def test_extract_boxed():
    text = "so $\\boxed{\\frac{1}{2}}$ and later \\boxed{3}"
    assert extract_boxed(text) == "\\frac{1}{2}"  # first, nested braces kept whole
    assert extract_boxed(text, last=True) == "3"
    assert extract_boxed("answer \\boxed 5.") == "5."
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{unclosed") is None


@pytest.mark.parametrize("group", [
    ["1/2", "\\frac{1}{2}", "\\dfrac12", "0.5", "$\\tfrac{1}{2}$", "0.50"],
    ["1000", "1,000", "\\$1,000", "1{,}000", "1,\\!000", "1000 dollars", "1000\\text{ cm}", "x = 1000"],
    ["90", "90^\\circ", "90^{\\circ}", "90\\text{ degrees}"],
    ["\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", "( 3 , \\dfrac{\\pi}{2} )"],
])
def test_normalize_answer_groups(group):
    assert len({normalize_answer(a) for a in group}) == 1, [normalize_answer(a) for a in group]


def test_normalize_answer_separates():
    keys = [normalize_answer(a) for a in ["0.5", "0.05", "12", "1.2", "(1,2)", "(2,1)", "-2", "2"]]
    assert len(set(keys)) == len(keys)
    assert normalize_answer(None) is None and normalize_answer("  $ $ ") is None


# ------------------------------------------------------------------------------------------------
# The checker
# ------------------------------------------------------------------------------------------------

EQUAL = [
    ("7", "7"), ("7.0", "7"), ("-2", "-2"), ("1,000", "1000"), ("10,\\!080", "10080"),  # integers, separators
    ("0.5", "\\frac{1}{2}"), ("1/2", "\\dfrac12"), ("\\frac{-3}{8}", "-\\frac38"), (".35625", "0.35625"),  # fractions
    ("0.333333", "\\frac{1}{3}"), ("1\\frac{4}{5}", "\\frac95"),  # rounded decimal, mixed number
    ("50\\%", "50"), ("50\\%", "0.5"), ("\\$18.90", "18.9"), ("18 dollars", "18"), ("5.4 \\text{ cents}", "5.4"),
    ("864 \\mbox{ inches}^2", "864"), ("90^\\circ", "90"),  # percent, currency, units, degrees
    ("\\text{Evelyn}", "Evelyn"), ("\\text{(C)}", "C"), ("Yes", "yes"),  # words
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"), ("(1,2)", "(1, 2)"),  # tuples, spacing commands
    ("[1, 2)", "\\left[1,2\\right)"), ("(-\\infty, 0]", "(-\\infty,0]"),  # intervals
    ("(0,9) \\cup (9,36)", "(9,36)\\cup(0,9)"),  # a union is a set of intervals
    ("\\{1,2\\}", "\\{2, 1\\}"), ("3, 1, 2", "1,2,3"), ("(1,8,19), (2,7,13)", "(2,7,13),(1,8,19)"),  # sets
    ("1 \\pm \\sqrt{19}", "1-\\sqrt{19}, 1+\\sqrt{19}"),
    ("x = 5", "5"), ("y = 2x + 3", "2x+3"), ("f(x)=2x", "2x"),  # a named answer
    ("2(n-1)", "2n-2"), ("\\sqrt2", "\\sqrt{2}"), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),  # symbolic
    ("6 - 5i", "-5i+6"), ("\\sqrt[3]{8}", "2"), ("e^{2x}", "(e^{x})^{2}"), ("3!", "6"), ("\\binom{4}{2}", "6"),
    ("5x - 7y + 11z + 4 = 0", "10x-14y+22z+8=0"),  # equations up to a factor
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}", "\\begin{pmatrix}-\\frac{1}{3}\\\\ \\frac23\\end{pmatrix}"),
    ("4.5e33", "4.5 \\times 10^{33}"), ("0.916515", "\\frac{\\sqrt{21}}{5}"),  # scientific, decimal of irrational
    ("The answer is $\\boxed{12}$", "12"),
]
UNEQUAL = [
    ("0.5", "0.05"), ("12", "1.2"), ("(1,2)", "(2,1)"), ("-2", "2"), ("7", "71"), ("1,000", "100"),  # near misses
    ("0.33", "\\frac13"), ("1.0000001", "1"), ("2^{100}+1", "2^{100}"), ("3.14", "\\pi"),  # different numbers
    ("[1,2)", "[1,2]"), ("(1,2)", "[1,2]"), ("(0,9)\\cup(9,36)", "(0,36)"),  # intervals
    ("1, 2", "1, 2, 3"), ("\\{1,2\\}", "(1,2)"), ("(1,8,19), (2,7,13)", "(1,8,19), (2,13,7)"),  # sets vs tuples
    ("2n-1", "2n-2"), ("\\sqrt{3}", "\\sqrt{2}"), ("x^2", "x^3"), ("6-5i", "6+5i"),  # symbolic
    ("x+y=1", "x+y=2"), ("Evelyn", "Navin"), ("", "5"), (None, "5"), ("5", None),
]


@pytest.mark.parametrize("pred,gold", EQUAL)
def test_checker_equal(pred, gold):
    assert answers_equal(pred, gold) and answers_equal(gold, pred)


@pytest.mark.parametrize("pred,gold", UNEQUAL)
def test_checker_unequal(pred, gold):
    assert not answers_equal(pred, gold) and not answers_equal(gold, pred)


def test_checker_time_budget():
    # sympy grinds ~10 s on this pair; the budget cuts it off and the answer counts as unequal
    import sympy  # noqa: F401  (its first import, seconds on a loaded machine, is not part of the budget)
    slow = ("\\cos(x)^{20}-\\sin(x)^{20}+\\tan(x)^{10}", "\\cos(2x)^{10}")
    t = time.time()
    assert answers_equal(*slow, timeout=0.3) is False
    assert time.time() - t < 1.3  # the budget, and slack for a loaded machine


def _run_in(attempt, in_thread: bool) -> None:
    """attempt() in the main thread (the SIGALRM path) or in a worker thread (the abandoned-thread path)."""
    if in_thread:
        th = threading.Thread(target=attempt)
        th.start()
        th.join(10)
    else:
        attempt()


@pytest.mark.parametrize("in_thread", [False, True])
def test_run_with_budget_stops_a_hang(in_thread):
    """The budget holds in the main thread (SIGALRM) and outside it (abandoned worker thread)."""
    stop = threading.Event()

    def spin():  # a hang (it ends when the test does: an abandoned thread must not spin on)
        while not stop.is_set():
            pass
    result = {}

    def attempt():
        t = time.time()
        with pytest.raises(checker._Timeout):
            checker._run_with_budget(spin, 0.2)
        result["took"] = time.time() - t
    _run_in(attempt, in_thread)
    stop.set()
    assert result["took"] < 2
    assert checker._run_with_budget(lambda: 42, 1.0) == 42




# ------------------------------------------------------------------------------------------------
# No input hangs or raises: each degenerate input returns within its budget (hard subprocess timeout)
# ------------------------------------------------------------------------------------------------

# (name, pred, gold) as Python expressions, so the subprocess builds the big strings itself
DEGENERATE = [
    ("unit words then a number", "'1' + ' m'*30 + ' 2'", "'5'"),
    ("repeated hrs then ')'", "'7' + ' hrs'*12 + ')'", "'5'"),
    ("400 spaces", "'1' + ' '*400 + '2'", "'12'"),
    ("10^6 spaces", "'1' + ' '*10**6 + '2'", "'12'"),
    ("unit words up to the cap", "'5' + ' cm'*600", "'5'"),
    ("letters that are all units", "'5 ' + 'm'*1900", "'5'"),
    ("unit words, square/cubic", "'5 ' + 'sq cubic m '*150 + '!'", "'5'"),
    ("text units", "'1' + '\\\\text{ cm}'*180", "'1'"),
    ("degree signs", "'5' + '^ '*900", "'5'"),
    ("thin spaces", "'1' + ' \\\\, '*400 + '2'", "'12'"),
    ("4,400-digit integer", "'9'*4400", "'1'"),
    ("5,000-digit integer, itself", "'1'*5000", "'1'*5000"),
    ("digits then a letter", "'1'*1999 + 'x'", "'5'"),
    ("10^6 digits", "'7'*10**6", "'7'"),
    ("huge e exponent", "'1e' + '9'*990", "'1'"),
    ("huge times-ten exponent", "'1\\\\times10^{' + '9'*900 + '}'", "'1'"),
    ("990 nested braces", "'{'*990 + '1' + '}'*990", "'1'"),
    ("1,000 nested braces", "'{'*1000 + '1' + '}'*1000", "'1'"),
    ("10^5 nested braces", "'{'*10**5 + '1' + '}'*10**5", "'1'"),
    ("990 nested parentheses", "'('*990 + '1' + ')'*990", "'1'"),
    ("nested tuples", "'('*300 + '1,2' + '),3'*300", "'(1,2)'"),
    ("nested fractions", "'\\\\frac{'*150 + '1' + '}{2}'*150", "'1'"),
    ("nested roots", "'\\\\sqrt{'*300 + '2' + '}'*300", "'2'"),
    ("unclosed boxes", "'\\\\boxed{'*20000", "'1'"),
    ("many pm", "'\\\\pm'*600", "'1'"),
    ("long list", "'x,'*900", "'x'"),
    ("many equals", "'x' + '=x'*900", "'x'"),
    ("many bars", "'|'*1900", "'1'"),
    ("dollar signs", "'$'*10**5 + '5'", "'5'"),
    ("power tower", "'9^{9^{9^{9}}}'", "'1'"),
    ("huge exponent", "'2^{10^{9}}'", "'2'"),
    ("big base to a big power", "'((10^{4})^{10^{4}})^{10^{4}}'", "'1'"),
    ("huge factorial", "'(10^{7})!'", "'1'"),
    ("long sum", "'x+'*190 + 'x'", "'191x'"),
    ("sympy grinds", "'\\\\cos(x)^{20}-\\\\sin(x)^{20}+\\\\tan(x)^{10}'", "'\\\\cos(2x)^{10}'"),
    ("60-item sets", "'\\\\{' + ','.join(f'x^{i}' for i in range(60)) + '\\\\}'",
     "'\\\\{' + ','.join(f'y^{i}' for i in range(60)) + '\\\\}'"),
    ("10^6 mixed characters", "'{(a1^_ \\\\frac'*80000", "'1'"),
]
BUDGET = 1.0


def test_degenerate_inputs_return_within_the_budget():
    """One subprocess under a hard timeout: first the vote key on every input (string work only:
    sympy is never imported), then the checker with its budget."""
    cases = ",".join(f"({json.dumps(n)}, {p}, {g})" for n, p, g in DEGENERATE)
    code = (
        "import json, sys, time, opensir\n"
        f"cases = [{cases}]\n"
        "for name, p, g in cases:\n"
        "    print(json.dumps({'start': name}), flush=True)\n"
        "    t = time.time(); key = opensir.normalize_answer(p); tk = time.time() - t\n"
        "    print(json.dumps({'key_of': name, 'key': type(key).__name__, 'tk': tk}), flush=True)\n"
        "print(json.dumps({'sympy_imported': 'sympy' in sys.modules}), flush=True)\n"
        "import checker, sympy\n"
        "for name, p, g in cases:\n"
        "    print(json.dumps({'start': name}), flush=True)\n"
        f"    t = time.time(); eq = checker.answers_equal(p, g, timeout={BUDGET}); te = time.time() - t\n"
        "    print(json.dumps({'name': name, 'eq': eq, 'te': te}), flush=True)\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"hung on {text.splitlines()[-1] if text else 'the first case'}")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    keys = [r for r in lines if "key_of" in r]
    rows = [r for r in lines if "name" in r]
    assert [r["key_of"] for r in keys] == [r["name"] for r in rows] == [n for n, _, _ in DEGENERATE]
    assert {"sympy_imported": False} in lines  # the vote key needs no sympy
    for r in keys:
        assert r["key"] in ("str", "NoneType") and r["tk"] < 0.5, r  # the vote key: fast, never an error
    for r in rows:
        assert isinstance(r["eq"], bool) and r["te"] < BUDGET + 1.0, r  # slack: a loaded 2-core machine
    by_name = {r["name"]: r for r in rows}
    assert by_name["400 spaces"]["eq"] and by_name["10^6 spaces"]["eq"]  # `1 2` is 12
    assert by_name["5,000-digit integer, itself"]["eq"]  # too long to read, but the very same text


def test_vote_key_of_degenerate_answers():
    assert normalize_answer("1" + " " * 400 + "2") == "12"
    assert normalize_answer("9" * 1500) == "9" * 1500  # too long to be read as a number: kept as text
    assert normalize_answer("9" * 4400) is None  # over MAX_ANSWER_CHARS (and int()'s limit): no vote, no error
    assert normalize_answer("{" * 1000 + "1" + "}" * 1000) is None  # over MAX_ANSWER_CHARS: no vote
    assert normalize_answer("x" * (checker.MAX_ANSWER_CHARS + 1)) is None
    assert normalize_answer("5 = x") == normalize_answer("x = 5") == "5"


@pytest.mark.parametrize("in_thread", [False, True])
def test_budget_not_swallowed_by_except_exception(in_thread):
    """sympy catches Exception in many places; the budget's timeout must get through them."""
    stop = threading.Event()

    def stubborn():
        while not stop.is_set():
            try:
                time.sleep(0.005)
            except Exception:  # noqa: BLE001
                pass
    result = {}

    def attempt():
        t = time.time()
        try:
            checker._run_with_budget(stubborn, 0.2)
        except checker._Timeout:
            result["took"] = time.time() - t
    _run_in(attempt, in_thread)
    stop.set()
    assert result["took"] < 2


def test_run_with_budget_passes_errors_through():
    for in_thread in (False, True):
        got = {}

        def attempt():
            t = time.time()
            with pytest.raises(ZeroDivisionError):
                checker._run_with_budget(lambda: 1 / 0, 5.0)
            got["took"] = time.time() - t  # at once, not after the budget
        _run_in(attempt, in_thread)
        assert got["took"] < 1


# ------------------------------------------------------------------------------------------------
# Wrong answers the old checker accepted, right ones it rejected, and their neighbours
# ------------------------------------------------------------------------------------------------

RC = "I(0) e^{-\\frac{t}{RC}}"
NOT_EQUAL_NOW = [
    # equations with no unknowns are statements about numbers, not "equal up to a factor"
    ("1=2", "3=5"), ("1=1", "2=2"), ("2+2=5", "3+3=7"), ("\\sqrt{4}=2", "\\sqrt{9}=3"),
    ("\\log \\frac{1}{1000100}=-6", "\\log \\frac{1}{1000000}=-6"), ("x=1", "1=2"),
    # a letter only ever applied to (...) is a function: I(0) is not I times 0
    ("0", RC), ("g(0)", RC), ("-I(0)", RC), ("I(0)", RC), ("f(1)", "f(2)"), ("f(x)", "g(x)"), ("y(0)", "0"),
    # names on either side still have to agree
    ("x=5", "y=5"), ("y_2 = x", "y_3 = x"), ("5 = x", "x = 6"), ("5 = x", "y = 5"),
    ("C_1 = 2, C_3 = 3", "C_1 = 2, C_2 = 3"),  # items of a list keep their names
    # Greek letters, nested exponents, log bases: different values stay different
    ("\\alpha", "\\beta"), ("\\theta^2", "\\theta^3"), ("\\sin\\alpha", "\\cos\\alpha"),
    ("e^{x^2}", "e^{2x}"), ("2^{2^{3}}", "64"), ("\\log_2 8", "4"), ("\\log_2 x", "\\log_3 x"),
]
EQUAL_NOW = [
    ("-6 = \\log \\frac{1}{1000000}", "\\log \\frac{1}{1000000}=-6"), ("2+2=4", "4=2+2"),  # same sides
    ("I(0)e^{-t/(RC)}", RC), ("a(b+c)", "ab+ac"), ("x(x+1)", "x^2+x"), ("P(1+r)^n", "P(r+1)^{n}"),
    ("5 = x", "x = 5"), ("f = m \\frac{dv}{dt} + bv", "m \\frac{dv}{dt} + bv = f"), ("x = y", "y = x"),
    ("2x+3=y", "y=2x+3"), ("c = a+b", "a+b-c=0"), ("5 = x", "5"),  # the name on the right
    ("\\alpha+\\beta", "\\beta+\\alpha"), ("2\\sin\\theta\\cos\\theta", "\\sin 2\\theta"),
    ("\\omega^2 r", "r\\omega^{2}"), ("\\frac{\\lambda}{2}", "0.5\\lambda"), ("\\Delta x", "x\\Delta"),
    ("e^{x^2}", "e^{x\\cdot x}"), ("2^{2^{3}}", "256"), ("e^{-x^2/2}", "\\frac{1}{e^{x^2/2}}"),
    ("2^{2019}", "2\\cdot 2^{2018}"), ("\\sin\\arctan t", "\\frac{t}{\\sqrt{1+t^2}}"),
    ("-\\sqrt{1+t^2}/t + C = \\frac{-1}{\\sin\\arctan t} + C", "\\frac{-1}{\\sin\\arctan t}+C=-\\sqrt{1+t^2}/t+C"),
    ("\\log_2 8", "3"), ("\\log_{3}(x)", "\\frac{\\ln x}{\\ln 3}"), ("\\log_{10} 1000", "3"),
    ("\\log_b x", "\\frac{\\ln x}{\\ln b}"),
]


@pytest.mark.parametrize("pred,gold", NOT_EQUAL_NOW)
def test_false_positives_fixed(pred, gold):
    assert not answers_equal(pred, gold) and not answers_equal(gold, pred)


@pytest.mark.parametrize("pred,gold", EQUAL_NOW)
def test_false_negatives_fixed(pred, gold):
    assert answers_equal(pred, gold) and answers_equal(gold, pred)


# ------------------------------------------------------------------------------------------------
# The last \boxed{} is the answer, in training's vote and in eval.py
# ------------------------------------------------------------------------------------------------

TWO_BOXES = "First try: \\boxed{1}. That was wrong; so the answer is \\boxed{2}."


def test_final_answer_is_the_last_box():
    assert final_answer(TWO_BOXES) == "2"
    assert final_answer("\\boxed{\\frac{1}{2}} then \\boxed{unclosed") == "\\frac{1}{2}"  # last that closes
    assert final_answer("no box") is None
    assert final_answer("\\boxed{\\left\\{ x \\right.}") == "\\left\\{ x \\right."  # escaped braces do not count


def test_training_votes_on_the_last_box(monkeypatch):
    class Tok:  # chat() only formats the text; no model is involved in reading answers
        def apply_chat_template(self, messages, **kw):
            return messages[0]["content"]
    teacher = "<think>t</think><problem>What is one plus one, exactly?</problem><concepts>integer addition</concepts>"

    def fake_generate(engine, tok, prompts, max_new_tokens, sampling, seeds, desc=""):
        text = teacher if desc == "teacher" else TWO_BOXES
        return [O.Completion([0], [1], text, False) for _ in prompts]
    monkeypatch.setattr(O, "generate", fake_generate)
    cfg = O.Config(w_div=0.0)
    pool = O.Pool(["What is 2 + 2?"], [["addition of integers"]])
    cands = O.play_rounds(None, None, Tok(), pool, {0: [0]}, 1, cfg, Counter())[0]
    legal = [c for c in cands if c.parsed.legal]
    assert legal and all(c.answers == ["2"] * cfg.student_group for c in legal)


def test_eval_scores_the_last_box_and_survives_a_failing_checker(tmp_path, monkeypatch, capsys):
    d = tmp_path / "data"
    d.mkdir()
    rows = [{"question": "What is 1+1?", "answer": "#### 2", "idx": 0}, {"question": "And 1+0?", "answer": "#### 1", "idx": 1}]
    (d / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    class Tok:  # generation is not under test here: what eval.py reads from a completion is
        pad_token_id = 0

        def apply_chat_template(self, messages, **kw):
            return messages[0]["content"]

    def fake_generate(model, tok, prompts, max_new_tokens, *a, **kw):
        return [O.Completion([0], [1], TWO_BOXES, False) for _ in prompts]
    monkeypatch.setattr(ev.opensir, "generate", fake_generate)
    monkeypatch.setattr(ev.opensir, "load_model", lambda *a, **kw: (None, Tok()))
    monkeypatch.setattr(ev.opensir, "eos_token_ids", lambda model, tok: [0])  # no model: generation is faked
    monkeypatch.setattr(ev.engines, "make_engine", lambda *a, **kw: type("Engine", (), {"name": "fake"})())
    real = checker.answers_equal

    def flaky(pred, gold, **kw):  # the checker blowing up on one sample must not end the evaluation
        if gold == "1":
            raise RecursionError("deep")
        return real(pred, gold, **kw)
    monkeypatch.setattr(checker, "answers_equal", flaky)
    out = str(tmp_path / "out")
    ev.main(["--model", "tiny", "--data-dir", str(d), "--benchmarks", "gsm8k", "--out", out, "--n", "1",
             "--max-new-tokens", "8", "--device", "cpu", "--no-download", "--engine", "generate"])
    samples = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    assert [(s["extracted"], s["correct"]) for s in samples] == [("2", True), ("2", False)]
    assert "checker failed on gsm8k problem 1 sample 0 (RecursionError" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Ordered parts, percents, comma lists, units: no false "equal"
# ------------------------------------------------------------------------------------------------

ORDERED_GOLD = checker.ordered_parts(["-3, 0"])  # "find b and c": b = -3, c = 0


def test_ordered_parts_form():
    assert ORDERED_GOLD == "\\langle -3, 0 \\rangle"
    assert checker.ordered_parts(["$-3$", "$0$"]) == ORDERED_GOLD
    assert checker.ordered_parts(["(1,2)"]) == "(1,2)"  # one part: unchanged


@pytest.mark.parametrize("pred,equal", [
    ("-3, 0", True), ("(-3, 0)", True), ("b = -3, c = 0", True), ("-3 \\text{ and } 0", True),
    ("(b, c) = (-3, 0)", True), ("b = -3; c = 0", True),
    ("0, -3", False), ("b = 0, c = -3", False), ("(0,-3)", False), ("-3", False), ("-3, 0, 1", False),
    ("(b, c) = (0, -3)", False), ("b = 0; c = -3", False)])
def test_ordered_parts_keep_their_order(pred, equal):
    assert answers_equal(pred, ORDERED_GOLD) is equal and answers_equal(ORDERED_GOLD, pred) is equal


def test_named_parts_against_a_bare_list_are_in_order():
    assert not answers_equal("b = 0, c = -3", "-3, 0")
    assert answers_equal("b = -3, c = 0", "-3, 0")
    assert answers_equal("x = 0, x = -3", "-3, 0")  # one name: the solutions of x, a set
    assert answers_equal("(b, c) = (-3, 0)", "-3, 0") and not answers_equal("(b, c) = (0, -3)", "-3, 0")
    assert answers_equal("b = -3, c = 0", "(-3, 0)") and not answers_equal("b = 0, c = -3", "(-3, 0)")
    assert not answers_equal("1, 2", "(1, 2)")  # a list is no tuple or interval


def test_olympiad_gold_orders_the_parts_the_question_names():
    q = "Determine the values of $b$ and $c$ so that $x^6 = T^3 + bT + c$."
    row = {"final_answer": ["-3,0"], "is_multiple_answer": True, "question": q}
    assert ev._olympiad_gold(row) == ORDERED_GOLD
    row = {"final_answer": ["-3,0"], "is_multiple_answer": True, "question": "Determine all values of $x$ and $y$."}
    assert ev._olympiad_gold(row) == "-3,0"  # a set of solutions
    assert ev._olympiad_gold({"final_answer": ["5"], "is_multiple_answer": False, "question": q}) == "5"


@pytest.mark.parametrize("pred,gold,equal", [
    ("62.5\\%", "62.5\\%", True), ("62.5", "62.5\\%", True), ("0.625", "62.5\\%", True),
    ("0.625\\%", "62.5\\%", False), ("6250\\%", "62.5\\%", False), ("1000\\%", "10", False),
    ("10\\%", "10", True), ("50\\%", "0.5", True), ("19.38", "1938\\%", False)])
def test_percent_not_read_100_times_off(pred, gold, equal):
    assert answers_equal(pred, gold) is equal and answers_equal(gold, pred) is equal


@pytest.mark.parametrize("pred,gold,equal", [
    ("40200", "40, 200", False), ("0,245", "245", False), ("1,234", "1234", True), ("1{,}234", "1234", True),
    ("1,\\!234", "1234", True), ("\\$1,234", "1234", True), ("1, 234", "1234", False), ("40, 200", "200, 40", True)])
def test_comma_list_is_not_a_thousands_number(pred, gold, equal):
    assert answers_equal(pred, gold) is equal and answers_equal(gold, pred) is equal


def test_vote_key_keeps_comma_lists_apart():
    assert normalize_answer("40, 200") == "40,200" != normalize_answer("40200")
    assert normalize_answer("40,200") == normalize_answer("40200") == "40200"
    assert normalize_answer("0,245") != normalize_answer("245")
    assert normalize_answer("0.\\overline{3}") == normalize_answer("\\frac13") == "1/3"


@pytest.mark.parametrize("pred,gold,equal", [
    ("15 \\text{ m}^2", "15 \\text{ cm}^2", False), ("90 \\text{ minutes}", "1.5 \\text{ hours}", False),
    ("90 minutes", "90 \\text{ hours}", False), ("3 km", "3 \\mathrm{~m}", False),
    ("15 \\text{ cm}^2", "15", True), ("15 square centimeters", "15 \\text{ cm}^2", True),
    ("6.5 \\mathrm{~m}", "6.5 meters", True), ("30 kilograms", "30 \\text{ kg}", True),
    ("5 \\text{ students}", "5 \\text{ people}", True)])  # counted nouns are no unit
def test_units_must_agree(pred, gold, equal):
    assert answers_equal(pred, gold) is equal and answers_equal(gold, pred) is equal


# ------------------------------------------------------------------------------------------------
# Forms of the same answer: no false "unequal"
# ------------------------------------------------------------------------------------------------

SAME_ANSWER = [
    ("x \\ge 3", "[3,\\infty)"), ("x\\geq 3", "x \\geqslant 3"), ("3 \\le x", "[3, \\infty)"), ("x > 3", "(3, \\infty)"),
    ("-1 < x \\le 2", "(-1, 2]"), ("5 > x > 1", "(1,5)"), ("x<2 \\text{ or } x>5", "(-\\infty,2)\\cup(5,\\infty)"),
    ("x > 1 \\text{ and } x < 3", "(1,3)"), ("\\{x \\mid x \\geq 3\\}", "[3,\\infty)"), ("x \\in [3,\\infty)", "x \\ge 3"),
    ("(-1,1]", "$-1<x \\leqslant 1:(-1,1]$"), ("x \\neq 2", "x \\ne 2"), ("x \u2265 3", "x \\ge 3"),
    ("0.\\overline{3}", "\\frac13"), ("0.333\\ldots", "\\frac{1}{3}"), ("0.1\\overline{6}", "\\frac16"),
    ("1.\\overline{27}", "\\frac{14}{11}"), ("0.\\dot{3}", "\\frac13"), ("0.142857142857\\ldots", "\\frac17"),
    ("\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right]", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
    ("\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", "$B^{-1}=\\left[\\begin{array}{rr}1&2\\\\3&4\\end{array}\\right]$"),
    ("3 \\text{ or } 5", "3, 5"), ("x=3 \\text{ or } x=-5", "-5, 3"), ("3 and 5", "5,3"), ("1, 2, and 3", "3,2,1"),
    ("{1 \\over 2}", "\\frac12"), ("\\cfrac{1}{2}", "0.5"), ("2 \\over 3", "\\frac{2}{3}"),
    ("\\approx 3.14", "3.14"), ("x \\approx 2.5", "2.5"), ("\\frac{\\sqrt{3}}{2} \\approx 0.866", "0.866"),
    ("x = \\frac{1}{3} \\approx 0.333", "\\frac13"),
    ("52_{8}", "52_8"), ("52_{(8)}", "52_8"), ("52_{\\text{eight}}", "52_8"), ("(52)_8", "52_8"), ("52", "52_8"),
    ("ff_{16}", "FF_{16}"), ("52 \\text{ (base 8)}", "52_8"),
    ("4.5E33", "4.5\\times10^{33}"), ("4.5E+3", "4500"), ("4.5e-3", "0.0045"),
]
DIFFERENT_ANSWER = [
    ("x > 3", "[3,\\infty)"), ("x \\ge 3", "x \\le 3"), ("x<2 \\text{ or } x>5", "(2,5)"), ("0.\\overline{3}", "0.3"),
    ("0.\\overline{3}", "\\frac{3}{10}"), ("0.\\overline{12}", "\\frac{1}{9}"),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\left[\\begin{array}{cc}1&3\\\\2&4\\end{array}\\right]"),
    ("3 \\text{ or } 5", "3, 6"), ("3 \\text{ or } 5", "3"), ("{2 \\over 1}", "\\frac12"), ("\\approx 3.15", "3.14"),
    ("5 \\approx 7", "7"), ("\\frac{1}{3} \\approx 0.333", "0.334"),
    ("52_8", "52_9"), ("42", "52_8"), ("40_{10}", "40_9"), ("4.5E33", "4.5E34"), ("4.5E3", "45000"),
]


@pytest.mark.parametrize("pred,gold", SAME_ANSWER)
def test_same_answer_in_other_spellings(pred, gold):
    assert answers_equal(pred, gold) and answers_equal(gold, pred)


@pytest.mark.parametrize("pred,gold", DIFFERENT_ANSWER)
def test_near_misses_of_other_spellings(pred, gold):
    assert not answers_equal(pred, gold) and not answers_equal(gold, pred)


# ------------------------------------------------------------------------------------------------
# The labelled pair set, argument order, heavy inputs, and math-verify side by side
# ------------------------------------------------------------------------------------------------

PAIRS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "checker_pairs.jsonl")


def _pairs() -> list[dict]:
    with open(PAIRS_PATH, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_labelled_pairs_no_false_equal_and_agreement():
    import checker_eval
    res = checker_eval.score(_pairs(), answers_equal)
    assert res["all"]["false_equal"] == 0, [p for k, r in res.items() if k != "all" for p in r["wrong"] if not p["label"]]
    assert res["all"]["right"] >= 0.995 * res["all"]["n"]


def test_verdict_does_not_depend_on_argument_order():
    for p in _pairs()[::3]:
        assert answers_equal(p["pred"], p["gold"]) == answers_equal(p["gold"], p["pred"]), p


HEAVY = [
    "\\lfloor 9999! \\rfloor", "\\sqrt{9999!}", "\\sqrt{(10^{4})!}", "\\lfloor \\binom{9999}{5000} \\rfloor",
    "\\sqrt{\\binom{20000}{10000}}", "\\frac{" * 40 + "1" + "}{2}" * 40, "\\sqrt{" * 40 + "2" + "}" * 40,
    "123456789123456789123456789^{x}", "(10^{300}+7)^{x}", "\\log(9999!)", "\\sin(9999!)", "\\sqrt{2^{9999}+1}",
    "(2^{9000}+3)^{1/3}", "\\lceil \\sqrt{9999!} \\rceil", "\\sqrt{\\sqrt{\\sqrt{9999!}}}", "9999!^{x}",
    "(9999!)^{1/2}", "2^{" * 30 + "2" + "}" * 30, "\\binom{10^{6}}{5}^{1/2}", "(3^{3000})^{y/2}",
    "\\sqrt{(\\lfloor 10^{300}^{10^{300}} \\rfloor)!}", "(((\\binom{4.5E33}{10^{300}!}))!)!", "((15 \\text{ cm}^2)!)!",
    "\\sqrt{(\\binom{\\log(10^{300}!)}{x})!}", "\\sqrt{\\lfloor \\sin(\\log(e!!))! \\rfloor}",
    "\\sqrt{123456789^{\\binom{15 \\text{ cm}^2}{123456789123456789}}}", "15 \\text{ cm}^2^{15 \\text{ cm}^2}!",
    "\\sqrt{\\sin(\\sqrt{\\sin(\\sqrt{\\sqrt{n+123456789123456789}!})})}", "(\\lfloor 123456789123456789 \\rfloor^{4.5E33})!",
]


def test_heavy_inputs_stay_under_a_second():
    answers_equal("1", "2")  # sympy imported
    worst = 0.0
    for h in HEAVY:
        for other in ("5", h + "+1", "x"):
            for a, b in ((h, other), (other, h)):
                t = time.perf_counter()
                assert answers_equal(a, b) in (True, False)
                worst = max(worst, time.perf_counter() - t)
    assert worst < 1.0, worst


def test_math_verify_side_by_side():
    """Per kind, on a slice of the pair set: at least as good as math-verify (an optional extra,
    requirements-compare.txt); skipped where it is not installed."""
    pytest.importorskip("math_verify")
    import checker_eval
    pairs = _pairs()[::40]
    ours, theirs = checker_eval.score(pairs, answers_equal), checker_eval.score(pairs, checker_eval.math_verify_equal())
    for kind, row in ours.items():
        assert row["right"] >= theirs[kind]["right"], (kind, row["right"], theirs[kind]["right"])
