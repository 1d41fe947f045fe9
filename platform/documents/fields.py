"""A list of floats in one column (a chunk's embedding): `double precision[]` on
PostgreSQL, JSON text on the embedded SQLite database, the same Python value on both."""

from __future__ import annotations

import json
from typing import Any

from django.db import models


class FloatArrayField(models.Field):
    description = "A list of floats (PostgreSQL array, JSON text elsewhere)"

    def db_type(self, connection: Any) -> str:
        return "double precision[]" if connection.vendor == "postgresql" else "text"

    def get_db_prep_value(self, value: Any, connection: Any, prepared: bool = False) -> Any:
        if value is None:
            return None
        floats = [float(x) for x in value]
        return floats if connection.vendor == "postgresql" else json.dumps(floats)

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> list[float] | None:
        if value is None:
            return None
        return [float(x) for x in (json.loads(value) if isinstance(value, str) else value)]

    def to_python(self, value: Any) -> list[float] | None:
        if value is None or isinstance(value, list):
            return value
        return [float(x) for x in (json.loads(value) if isinstance(value, str) else value)]
