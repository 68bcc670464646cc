"""The calculator tool: a safe evaluator for the expressions a chat model writes between
<|python_start|> and <|python_end|>.

The reference eval()s the string with no builtins after a character filter, under a 3 s
signal.alarm. We keep its *language* (what it accepts and what it answers) and replace the
mechanism, because eval is one filter bug away from running code and signal.alarm only works on
the main thread (the web server evaluates tool calls from worker threads):

- accepted: numbers, + - * / // %, unary + -, parentheses (commas stripped: "1,234" is 1234), and
  the form 'text'.count('x') that the spelling tasks use. `**` is refused like the reference
  (2**2**2**99 would never finish), so is everything else: names, attributes other than the one
  .count call, calls, subscripts, lambdas, comprehensions, f-strings, bytes, complex numbers.
- parsed with `ast` and walked over a whitelist of node types; nothing is ever compiled or run.
- the work is bounded structurally: at most MAX_CHARS characters and MAX_DEPTH nesting (a flat
  chain like 1+2+3+... is one level however long: the parser builds it as a left-leaning tree,
  which is walked as a loop, not by recursion; parentheses and unary signs nest), ints at
  most MAX_INT_BITS bits (without ** a product of n short literals only grows linearly), floats
  finite. A deadline (checked at every node) backs that up and works on any thread.

    >>> use_calculator("12,000 / 8 + 3")
    '1503.0'
    >>> use_calculator("'strawberry'.count('r')")
    '3'
    >>> use_calculator("__import__('os').system('ls')") is None
    True
"""
from __future__ import annotations

import ast
import math
import operator
import time

MAX_CHARS = 1000        # longer tool calls are not arithmetic a model needs help with
MAX_DEPTH = 100         # AST nesting; CPython's parser also refuses > 200 nested parentheses
MAX_INT_BITS = 1024     # ~308 decimal digits, the float range: every intermediate int stays cheap
DEFAULT_TIMEOUT = 3.0   # seconds, as the reference

# The reference's character filter for the arithmetic form (plus % for modulo).
_ARITHMETIC_CHARS = frozenset("0123456789*+-/.()% ")

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARYOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """The expression was refused or could not be evaluated; the message says why."""


def _depth(tree: ast.AST) -> int:
    """Nesting depth of an AST, computed without recursion (so a hostile tree cannot overflow).

    The left operand of a binary operation that is itself a binary operation stays at its parent's
    level: `1+1+...+1` (500 terms) is a 500-deep left-leaning tree but a flat sum, evaluated by a
    loop (_Evaluator.binop), so it costs no recursion. Right operands and everything else nest."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > MAX_DEPTH:
            return deepest
        for child in ast.iter_child_nodes(node):
            chained = isinstance(node, ast.BinOp) and child is node.left and isinstance(child, ast.BinOp)
            stack.append((child, d if chained else d + 1))
    return deepest


def _is_count_call(node: ast.AST) -> bool:
    """Exactly 'literal'.count('literal'): the only call the calculator accepts."""
    return (isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and type(node.func.value.value) is str
            and len(node.args) == 1 and not node.keywords
            and isinstance(node.args[0], ast.Constant) and type(node.args[0].value) is str)


class _Evaluator:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def check(self, value):
        if type(value) is int and value.bit_length() > MAX_INT_BITS:
            raise CalculatorError(f"number too large (more than {MAX_INT_BITS} bits)")
        if type(value) is float and not math.isfinite(value):
            raise CalculatorError("result is not a finite number")
        return value

    def eval(self, node: ast.AST):
        if time.monotonic() > self.deadline:
            raise CalculatorError("timed out")
        if isinstance(node, ast.Expression):
            return self.eval(node.body)
        if isinstance(node, ast.Constant):
            # bool is an int subclass and complex a number: both refused by exact type.
            if type(node.value) in (int, float):
                return self.check(node.value)
            raise CalculatorError(f"literal {node.value!r} is not a number")
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARYOPS:
            return self.check(_UNARYOPS[type(node.op)](self.eval(node.operand)))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return self.binop(node)
        if _is_count_call(node):
            return node.func.value.value.count(node.args[0].value)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            raise CalculatorError("the power operator ** is not allowed")
        raise CalculatorError(f"{type(node).__name__} is not allowed: only numbers, + - * / // %, "
                              "parentheses and 'text'.count('x')")


    def binop(self, node: ast.BinOp):
        """A left-leaning chain a op b op c ... as a loop: its length costs no recursion depth."""
        chain = []
        while isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            chain.append(node)
            node = node.left
        value = self.eval(node)             # the innermost left operand (** is refused there)
        for link in reversed(chain):
            right = self.eval(link.right)
            try:
                value = self.check(_BINOPS[type(link.op)](value, right))
            except ZeroDivisionError:
                raise CalculatorError("division by zero") from None
            except OverflowError:
                raise CalculatorError("result is too large for a float") from None
        return value


def evaluate(expr: str, timeout: float = DEFAULT_TIMEOUT) -> int | float:
    """Evaluate one calculator expression; raises CalculatorError saying why it was refused.

    Safe to call from any thread: no eval, no signals, bounded work, a deadline per node.
    """
    if not isinstance(expr, str):
        raise CalculatorError(f"expected a string, got {type(expr).__name__}")
    if len(expr) > MAX_CHARS:
        raise CalculatorError(f"expression too long ({len(expr)} characters, at most {MAX_CHARS})")
    if "**" in expr:
        raise CalculatorError("the power operator ** is not allowed")
    stripped = expr.replace(",", "")
    if set(stripped) <= _ARITHMETIC_CHARS:
        source = stripped                   # arithmetic: commas are thousands separators
    elif ".count(" in expr:
        source = expr                       # the string form: keep commas inside the literals
    else:
        bad = sorted(set(stripped) - _ARITHMETIC_CHARS)[:5]
        raise CalculatorError(f"characters {''.join(bad)!r} are not allowed: only numbers, "
                              "+ - * / // %, parentheses and 'text'.count('x')")
    source = source.strip()
    if not source:
        raise CalculatorError("empty expression")
    deadline = time.monotonic() + timeout
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalculatorError(f"could not parse {source[:40]!r}: {e.__class__.__name__}: "
                              f"{getattr(e, 'msg', e)}") from None
    if _depth(tree) > MAX_DEPTH:
        raise CalculatorError(f"expression nested too deeply (more than {MAX_DEPTH} levels)")
    return _Evaluator(deadline).eval(tree)


def use_calculator(expr: str, timeout: float = DEFAULT_TIMEOUT) -> str | None:
    """The engine's tool: the result as the text to inject (str() like the reference, so 80/4
    gives '20.0'), or None when the expression is refused (then nothing is injected)."""
    try:
        return str(evaluate(expr, timeout))
    except CalculatorError:
        return None
