"""Built-in plugins, one folder each, registered under the `parley.plugins` entry-point
group in pyproject.toml like any third-party plugin (DESIGN section 6)."""
