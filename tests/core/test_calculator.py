"""The calculator tool: what it answers (like the reference) and what it refuses (quickly, clearly)."""
from __future__ import annotations

import threading
import time

import pytest

from core.calculator import MAX_CHARS, CalculatorError, evaluate, use_calculator


@pytest.mark.parametrize("expr, expected", [
    ("2 + 2", "4"),
    ("123,456 * 789", "97406784"),          # commas are thousands separators (reference)
    ("(100 - 20) / 4", "20.0"),             # true division gives a float, as eval does
    ("7 // 2", "3"),
    ("7 % 3", "1"),
    ("-3 + +5", "2"),
    ("0.1 * 3", str(0.1 * 3)),
    ("  48/2 ", "24.0"),
    ("'strawberry'.count('r')", "3"),
    ('"banana".count("a")', "3"),
    ("'a, b, c'.count(',')", "2"),          # commas inside a string literal are kept
    ("'mississippi'.count('ss') + 1", "3"),
])
def test_accepts_reference_arithmetic(expr, expected):
    assert use_calculator(expr) == expected


INJECTIONS = [
    "__import__('os').system('echo pwned')",
    "().__class__.__bases__[0].__subclasses__()",
    "'a'.__class__",
    "'x'.count.__self__",
    "open('/etc/passwd').read()",
    "lambda: 1",
    "(lambda x: x)(1)",
    "[x for x in range(10)]",
    "{x: 1 for x in 'ab'}",
    "exec('1')",
    "eval('1+1')",
    "globals()",
    "'abc'.upper()",
    "'abc'.count(__import__('os'))",
    "'abc'.count('a', 0)",                 # only the one-argument form
    "'abc'.count(x='a')",
    "f'{1+1}'.count('2')",
    "b'aa'.count(b'a')",
    "1j + 1",
    "True + 1",
    "1 if 1 else 2",
    "(a := 5)",
    "1; 2",
    "import os",
    "x",
    "2 ** 10",                              # ** refused like the reference
    "2**2**2**2**2**2**2",
    "9" * 20 + "**" + "9" * 20,
    "1 << 100000",
    "'a' * 10",                             # quotes are not arithmetic, and no .count(
    "",
    "   ",
    "1 +",
    "(" * 300 + "1" + ")" * 300,            # deep nesting
    "-" * 500 + "1",                        # deep unary nesting
    "1" + "+1" * (MAX_CHARS // 2),          # very long input
    "9" * 2000,                             # huge literal (and too long)
    "9" * 400,                              # huge literal
    "*".join(["9" * 40] * 20),              # product past the int size limit
]


@pytest.mark.parametrize("expr", INJECTIONS)
def test_refuses_injection_quickly_with_clear_error(expr):
    t0 = time.perf_counter()
    with pytest.raises(CalculatorError) as err:
        evaluate(expr)
    assert time.perf_counter() - t0 < 0.1, "refusal must be immediate"
    assert str(err.value), "the error must say what was wrong"
    assert use_calculator(expr) is None


def test_error_messages_name_the_problem():
    with pytest.raises(CalculatorError, match=r"\*\*"):
        evaluate("2 ** 3")
    with pytest.raises(CalculatorError, match="not allowed"):
        evaluate("__import__('os')")
    with pytest.raises(CalculatorError, match="division by zero"):
        evaluate("1 / 0")
    with pytest.raises(CalculatorError, match="too long"):
        evaluate("1+" * MAX_CHARS + "1")
    assert evaluate("(" * 150 + "1" + ")" * 150) == 1   # parentheses alone add no AST depth
    with pytest.raises(CalculatorError, match="nested too deeply"):
        evaluate("-(" * 150 + "1" + ")" * 150)
    with pytest.raises(CalculatorError, match="could not parse"):
        evaluate("(" * 300 + "1" + ")" * 300)
    with pytest.raises(CalculatorError, match="too large"):
        evaluate("*".join(["9" * 20] * 20))       # 400 digits > 1024 bits
    with pytest.raises(CalculatorError, match="too large"):
        evaluate("9" * 400 + "/ 1")               # int too large for a float


def test_deadline_works_off_the_main_thread():
    """signal.alarm would raise 'signal only works in main thread' here; the deadline does not."""
    results = {}

    def work():
        results["ok"] = use_calculator("1 + 2 * 3")
        try:
            evaluate("1" + "+1" * 60, timeout=-1.0)   # already past the deadline
        except CalculatorError as e:
            results["timeout"] = str(e)

    t = threading.Thread(target=work)
    t.start()
    t.join(5)
    assert results == {"ok": "7", "timeout": "timed out"}


def test_long_flat_sums_are_one_level_deep():
    """A chain of 500 terms is a flat sum (the parser's left-leaning tree is not nesting); the same
    length nested through parentheses or unary signs is still refused."""
    flat = "+".join(["1"] * 500)                      # 999 characters, under MAX_CHARS
    assert evaluate(flat) == 500
    assert evaluate("-".join(["2"] * 400)) == 2 - 2 * 399
    assert evaluate("*".join(["1"] * 300) + "+7//2%5") == 4
    assert evaluate("(" + "+".join(["3"] * 200) + ")*2") == 1200
    assert use_calculator("+".join(["0.5"] * 200)) == "100.0"
    with pytest.raises(CalculatorError, match="nested too deeply"):
        evaluate("1+(" * 120 + "1" + ")" * 120)           # right-nested: real nesting
    with pytest.raises(CalculatorError, match="nested too deeply"):
        evaluate("-" * 150 + "1+1")          # unary signs nest
    with pytest.raises(CalculatorError, match=r"\*\*"):
        evaluate("+".join(["1"] * 300) + "+2**3")
    with pytest.raises(CalculatorError, match="not allowed"):
        evaluate("+".join(["1"] * 200) + "+'a'.count('a').real")
    with pytest.raises(CalculatorError, match="too large"):
        evaluate("*".join(["99999999"] * 60))              # still bounded along a flat chain
