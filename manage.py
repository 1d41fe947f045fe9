#!/usr/bin/env python
"""Django's command-line utility for Parley."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> None:
    # platform/ is a source root (its apps are top-level packages); appending it
    # keeps the standard library's `platform` module first on the path.
    for path in (ROOT / "platform", ROOT):
        if str(path) not in sys.path:
            sys.path.append(str(path))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
