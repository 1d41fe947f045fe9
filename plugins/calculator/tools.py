"""The calculator's LangChain tools. Each returns text for the model; bad input comes
back as a sentence starting with "Error:" so the model can correct itself."""

from __future__ import annotations

from datetime import date, timedelta

from langchain_core.tools import tool

from plugins.calculator.evaluate import CalculationError, evaluate, format_number
from plugins.calculator.units import UnitError, convert


@tool(parse_docstring=True)
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly and return its value.

    Supports + - * / // % and ** (or ^) for powers, parentheses, the constants pi, e
    and tau, and the functions abs, round, min, max, sqrt, exp, log, log10, log2,
    sin, cos, tan, asin, acos, atan, degrees, radians, floor, ceil, factorial, gcd,
    hypot. Angles are in radians.

    Args:
        expression: The expression, for example "(17.5 * 12) / 3 + sqrt(2)".
    """
    try:
        return format_number(evaluate(expression))
    except CalculationError as exc:
        return f"Error: {exc}"


@tool(parse_docstring=True)
def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a quantity between units of length, mass, time, volume, data or temperature.

    Args:
        value: The quantity to convert, for example 3.5.
        from_unit: The unit of the value, for example "km", "lb", "h", "l", "GiB", "degC".
        to_unit: The unit wanted, of the same kind, for example "mi", "kg", "min", "degF".
    """
    try:
        return f"{format_number(convert(value, from_unit, to_unit))} {to_unit.strip()}"
    except UnitError as exc:
        return f"Error: {exc}"


def _date(text: str, argument: str) -> date:
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{argument} must be a date as YYYY-MM-DD, not {text!r}.") from None


@tool(parse_docstring=True)
def days_between(start: str, end: str) -> str:
    """Count the days from one date to another (negative when end is before start).

    Args:
        start: The first date, as YYYY-MM-DD.
        end: The second date, as YYYY-MM-DD.
    """
    try:
        delta = _date(end, "end") - _date(start, "start")
    except ValueError as exc:
        return f"Error: {exc}"
    return str(delta.days)


@tool(parse_docstring=True)
def date_shift(start: str, days: int) -> str:
    """The date a number of days after (or, when negative, before) a date, with its weekday.

    Args:
        start: The date to start from, as YYYY-MM-DD.
        days: How many days to add; negative to go back.
    """
    try:
        result = _date(start, "start") + timedelta(days=days)
    except ValueError as exc:
        return f"Error: {exc}"
    except OverflowError:
        return "Error: the date falls outside years 1 to 9999."
    return f"{result.isoformat()} ({result.strftime('%A')})"
