"""How static files are stored when collected: WhiteNoise's compressed manifest storage
(names that carry a hash of the content, gzip copies), with one difference: references
to source maps are left as they are.

A vendored package (Swagger UI from npm) may ship its CSS and JS with a
`sourceMappingURL` comment and without the map; Django's manifest storage would refuse
to collect it. A missing map costs only the browser's developer tools a request; every
`url()` and `@import` of a stylesheet is still checked and renamed.
"""

from __future__ import annotations

from django.contrib.staticfiles.storage import HashedFilesMixin
from whitenoise.storage import CompressedManifestStaticFilesStorage


def _without_source_maps(patterns: tuple) -> tuple:
    kept = []
    for glob, rules in patterns:
        rules = tuple(rule for rule in rules if "sourceMappingURL" not in str(rule))
        if rules:
            kept.append((glob, rules))
    return tuple(kept)


class StaticFilesStorage(CompressedManifestStaticFilesStorage):
    patterns = _without_source_maps(HashedFilesMixin.patterns)
