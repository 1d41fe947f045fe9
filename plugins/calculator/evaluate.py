"""A safe arithmetic evaluator: `ast` parsing, a fixed whitelist, bounded work.

Only numbers, + - * / // % **, unary signs, parentheses, the constants pi, e and tau
and the functions in FUNCTIONS. No names, attributes, subscripts, calls of anything
else, comprehensions or strings, so there is nothing to escape through. Exponents and
integer sizes are bounded so `9**9**9` is refused instead of eating the worker.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 1000
MAX_INT_BITS = 4096
MAX_DEPTH = 50

Number = int | float


class CalculationError(ValueError):
    """The expression is not allowed or cannot be evaluated; the message says why."""


CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}

FUNCTIONS: dict[str, Callable[..., Number]] = {
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log": math.log,
    "log10": math.log10,
    "log2": math.log2,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "degrees": math.degrees,
    "radians": math.radians,
    "floor": math.floor,
    "ceil": math.ceil,
    "factorial": math.factorial,
    "gcd": math.gcd,
    "hypot": math.hypot,
}

BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}

UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


def _check_size(value: Number) -> Number:
    if isinstance(value, bool):
        raise CalculationError("Booleans are not numbers here.")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculationError(f"The result has more than {MAX_INT_BITS} bits.")
    if isinstance(value, float) and math.isnan(value):
        raise CalculationError("The result is not a number.")
    return value


def _bits(value: Number) -> int:
    return value.bit_length() if isinstance(value, int) else 0


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculationError(f"Exponents are limited to ±{MAX_EXPONENT}.")
    # Bound an integer power's size before computing it, not after.
    exact = isinstance(base, int) and isinstance(exponent, int) and exponent > 0
    if exact and _bits(base) * exponent > MAX_INT_BITS:
        raise CalculationError(f"The result has more than {MAX_INT_BITS} bits.")
    return operator.pow(base, exponent)


def _eval(node: ast.AST, depth: int) -> Number:
    if depth > MAX_DEPTH:
        raise CalculationError("The expression is nested too deeply.")
    if isinstance(node, ast.Expression):
        return _eval(node.body, depth + 1)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalculationError(f"Only numbers are allowed, not {node.value!r}.")
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in CONSTANTS:
            raise CalculationError(f"Unknown name {node.id!r}; constants: {', '.join(CONSTANTS)}.")
        return CONSTANTS[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        if isinstance(node.op, ast.Mult) and _bits(left) + _bits(right) > MAX_INT_BITS + 1:
            raise CalculationError(f"The result has more than {MAX_INT_BITS} bits.")
        return _check_size(BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_eval(node.operand, depth + 1))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        function = FUNCTIONS.get(node.func.id)
        if function is None or node.keywords:
            raise CalculationError(
                f"Unknown function {node.func.id!r}; functions: {', '.join(FUNCTIONS)}."
            )
        arguments = [_eval(argument, depth + 1) for argument in node.args]
        if function is math.factorial and arguments and arguments[0] > 1000:
            raise CalculationError("factorial is limited to 1000.")
        return _check_size(function(*arguments))
    raise CalculationError(f"{type(node).__name__} is not allowed in an expression.")


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression, or CalculationError saying why not."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculationError(f"Expressions are limited to {MAX_EXPRESSION_CHARS} characters.")
    text = expression.strip().replace("^", "**").replace("\N{MULTIPLICATION SIGN}", "*")
    text = text.replace("\N{DIVISION SIGN}", "/")
    if not text:
        raise CalculationError("The expression is empty.")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise CalculationError(f"The expression does not parse: {exc.msg}.") from None
    try:
        return _eval(tree, 0)
    except CalculationError:
        raise
    except ZeroDivisionError:
        raise CalculationError("Division by zero.") from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise CalculationError(f"Cannot evaluate: {exc}.") from None


def format_number(value: Number) -> str:
    """Integers exactly; floats to 15 significant digits (0.1 + 0.2 shows as 0.3)."""
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "infinity" if value > 0 else "-infinity"
    return f"{value:.15g}"
