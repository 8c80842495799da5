"""Fills `{{KEY}}` placeholders in an Envoy YAML template.

Usage: render.py TEMPLATE OUT KEY=VALUE...  A VALUE starting with `@` names
a JSON file whose compact text is used (for the filter configuration, which
sits inside a single-quoted YAML string, so `'` is doubled).
"""
import json
import re
import sys
from pathlib import Path


def render(template: str, values: dict) -> str:
    def sub(match):
        key = match.group(1)
        if key not in values:
            raise KeyError(f"no value for placeholder {{{{{key}}}}}")
        return str(values[key])

    return re.sub(r"\{\{([A-Z_]+)\}\}", sub, template)


def filter_config_value(config) -> str:
    """The plugin configuration as it goes inside '...' in the YAML."""
    text = config if isinstance(config, str) else json.dumps(config, separators=(",", ":"))
    return text.replace("'", "''")


def main(argv):
    template, out, *pairs = argv
    values = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if value.startswith("@"):
            value = filter_config_value(json.loads(Path(value[1:]).read_text()))
        values[key] = value
    Path(out).write_text(render(Path(template).read_text(), values))


if __name__ == "__main__":
    main(sys.argv[1:])
