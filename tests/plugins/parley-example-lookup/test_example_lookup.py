"""The plugin's own test: Parley's conformance suite, run against the installed
distribution (as a plugin author would in their repository)."""

from agents.testing import PluginConformance


class TestExampleLookupConformance(PluginConformance):
    entry_point = "example_lookup"
    settings_examples = [
        {"api_key": "k-0123456789"},
        {"api_key": "k-0123456789", "endpoint": "https://dir.example.com", "max_results": 5},
    ]
    invalid_settings_examples = [
        {},  # api_key is required
        {"api_key": "short"},
        {"api_key": "k-0123456789", "max_results": 0},
        {"api_key": "k-0123456789", "colour": "blue"},
        {"api_key": "k-0123456789", "endpoint": "http://dir.example.com"},  # the hook
    ]
