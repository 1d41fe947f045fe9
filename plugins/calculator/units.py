"""Unit conversion over a fixed table: every unit is a factor of its kind's base unit
(temperatures, which have offsets, are converted through kelvin)."""

from __future__ import annotations

import math


class UnitError(ValueError):
    """Unknown unit, or units of different kinds."""


# kind -> unit -> how many base units one of it is.
FACTORS: dict[str, dict[str, float]] = {
    "length (base m)": {
        "mm": 1e-3, "cm": 1e-2, "m": 1.0, "km": 1e3,
        "in": 0.0254, "ft": 0.3048, "yd": 0.9144, "mi": 1609.344, "nmi": 1852.0,
    },
    "mass (base kg)": {
        "mg": 1e-6, "g": 1e-3, "kg": 1.0, "t": 1e3,
        "oz": 0.028349523125, "lb": 0.45359237, "st": 6.35029318,
    },
    "time (base s)": {
        "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "wk": 604800.0,
    },
    "volume (base l)": {
        "ml": 1e-3, "cl": 1e-2, "l": 1.0, "m3": 1e3,
        "tsp": 0.00492892159375, "tbsp": 0.01478676478125, "cup": 0.2365882365,
        "pt": 0.473176473, "qt": 0.946352946, "gal": 3.785411784,
    },
    "data (base B)": {
        "bit": 0.125, "B": 1.0,
        "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
        "KiB": 2.0**10, "MiB": 2.0**20, "GiB": 2.0**30, "TiB": 2.0**40,
    },
}  # fmt: skip

ALIASES = {
    "meter": "m", "meters": "m", "metre": "m", "kilometer": "km", "kilometers": "km",
    "mile": "mi", "miles": "mi", "foot": "ft", "feet": "ft", "inch": "in", "inches": "in",
    "kilogram": "kg", "kilograms": "kg", "gram": "g", "grams": "g", "pound": "lb",
    "pounds": "lb", "lbs": "lb", "ounce": "oz", "ounces": "oz",
    "second": "s", "seconds": "s", "sec": "s", "minute": "min", "minutes": "min",
    "hour": "h", "hours": "h", "hr": "h", "day": "d", "days": "d", "week": "wk", "weeks": "wk",
    "liter": "l", "liters": "l", "litre": "l", "litres": "l", "L": "l", "gallon": "gal",
    "gallons": "gal", "byte": "B", "bytes": "B", "bits": "bit",
    "°C": "degC", "C": "degC", "celsius": "degC", "°F": "degF", "F": "degF",
    "fahrenheit": "degF", "K": "kelvin",
}  # fmt: skip

TEMPERATURES = {"degC", "degF", "kelvin"}


def _canonical(unit: str) -> str:
    unit = unit.strip()
    return ALIASES.get(unit, ALIASES.get(unit.lower(), unit))


def _kind(unit: str) -> str | None:
    return next((kind for kind, units in FACTORS.items() if unit in units), None)


def _to_kelvin(value: float, unit: str) -> float:
    if unit == "degC":
        return value + 273.15
    if unit == "degF":
        return (value - 32) * 5 / 9 + 273.15
    return value


def _from_kelvin(value: float, unit: str) -> float:
    if unit == "degC":
        return value - 273.15
    if unit == "degF":
        return (value - 273.15) * 9 / 5 + 32
    return value


def convert(value: float, from_unit: str, to_unit: str) -> float:
    if not math.isfinite(value):
        raise UnitError("The value must be a finite number.")
    source, target = _canonical(from_unit), _canonical(to_unit)
    if source in TEMPERATURES or target in TEMPERATURES:
        if not (source in TEMPERATURES and target in TEMPERATURES):
            raise UnitError(f"Cannot convert {from_unit!r} to {to_unit!r}: different kinds.")
        kelvin = _to_kelvin(value, source)
        if kelvin < 0:
            raise UnitError("That temperature is below absolute zero.")
        return _from_kelvin(kelvin, target)
    source_kind, target_kind = _kind(source), _kind(target)
    for unit, kind in ((from_unit, source_kind), (to_unit, target_kind)):
        if kind is None:
            known = ", ".join(sorted({u for units in FACTORS.values() for u in units}))
            raise UnitError(f"Unknown unit {unit!r}; known: {known}, degC, degF, kelvin.")
    if source_kind != target_kind:
        raise UnitError(
            f"Cannot convert {from_unit!r} ({source_kind}) to {to_unit!r} ({target_kind})."
        )
    assert source_kind is not None
    return value * FACTORS[source_kind][source] / FACTORS[source_kind][target]
