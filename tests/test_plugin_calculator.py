"""The built-in calculator plugin: the conformance suite, and its tools' behaviour."""

from __future__ import annotations

import pytest

from agents.testing import PluginConformance
from plugins.calculator.evaluate import CalculationError, evaluate
from plugins.calculator.tools import calculate, convert_units, date_shift, days_between


class TestCalculatorConformance(PluginConformance):
    entry_point = "calculator"
    settings_examples = [{}]
    invalid_settings_examples = [{"precision": 3}]


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("0.1 + 0.2", "0.3"),
        ("2 ^ 10", "1024"),
        ("2 ** 100", "1267650600228229401496703205376"),
        ("7 // 2 + 7 % 2", "4"),
        ("-3 ** 2", "-9"),
        ("sqrt(16) + abs(-2)", "6"),
        ("max(3, 9, 4) - min(3, 9, 4)", "6"),
        ("round(pi, 4)", "3.1416"),
        ("factorial(10)", "3628800"),
        ("1 / 3", "0.333333333333333"),
    ],
)
def test_calculate(expression, value):
    assert calculate.invoke({"expression": expression}) == value


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("__import__('os').system('true')", "Call is not allowed"),
        ("__import__('os')", "Unknown function '__import__'"),
        ("(1).__class__", "Attribute is not allowed"),
        ("open('/etc/passwd')", "Unknown function"),
        ("[x for x in range(9)]", "ListComp is not allowed"),
        ("'a' * 3", "Only numbers"),
        ("True + 1", "Only numbers"),
        ("x + 1", "Unknown name 'x'"),
        ("9 ** 9 ** 9", "Exponents are limited"),
        ("99999 ** 999", "more than 4096 bits"),
        ("factorial(5000)", "factorial is limited"),
        ("1 / 0", "Division by zero"),
        ("sqrt(-1)", "Cannot evaluate"),
        ("1 +", "does not parse"),
        ("1" * 501, "limited to 500 characters"),
        ("-" * 60 + "1", "nested too deeply"),
        ("", "empty"),
    ],
)
def test_calculate_refuses(expression, reason):
    with pytest.raises(CalculationError, match=reason):
        evaluate(expression)
    assert calculate.invoke({"expression": expression}).startswith("Error: ")


def test_convert_units():
    assert convert_units.invoke({"value": 100, "from_unit": "degC", "to_unit": "degF"}) == (
        "212 degF"
    )
    assert convert_units.invoke({"value": 1, "from_unit": "mile", "to_unit": "km"}) == (
        "1.609344 km"
    )
    assert convert_units.invoke({"value": 1, "from_unit": "GiB", "to_unit": "MiB"}) == "1024 MiB"
    refused = convert_units.invoke({"value": 1, "from_unit": "kg", "to_unit": "m"})
    assert refused.startswith("Error: Cannot convert 'kg'")
    assert "Unknown unit 'furlong'" in convert_units.invoke(
        {"value": 1, "from_unit": "furlong", "to_unit": "m"}
    )
    assert "absolute zero" in convert_units.invoke(
        {"value": -300, "from_unit": "degC", "to_unit": "kelvin"}
    )


def test_dates():
    assert days_between.invoke({"start": "2024-01-01", "end": "2024-03-01"}) == "60"
    assert days_between.invoke({"start": "2024-03-01", "end": "2024-01-01"}) == "-60"
    assert date_shift.invoke({"start": "2024-02-28", "days": 1}) == "2024-02-29 (Thursday)"
    assert date_shift.invoke({"start": "2023-02-28", "days": 1}) == "2023-03-01 (Wednesday)"
    assert days_between.invoke({"start": "yesterday", "end": "2024-01-01"}).startswith(
        "Error: start must be a date"
    )
    assert date_shift.invoke({"start": "9999-12-31", "days": 1}).startswith("Error:")
