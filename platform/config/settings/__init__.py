"""Settings modules: `base` (both modes, chosen by the environment), `production`, `test`."""
