"""Built-in plugins, one folder each, registered under the `parley.plugins` entry-point
group like any third-party plugin (DESIGN section 6). None yet."""
