"""The config reference table of README.md, generated from SETTINGS.

README.md holds this output (`python -m gearvisor.config --markdown`, see
gearvisor/config/__main__.py) and a test checks that it is still there, so the reference
cannot drift from the declarations.
"""

from __future__ import annotations

from gearvisor.config.settings import SETTINGS


def markdown_reference() -> str:
    """The config reference table for README.md, generated from SETTINGS."""
    rows = ["| key | where | default | meaning |", "| --- | --- | --- | --- |"]
    where = {"global": "top level", "pool": "pool", "both": "top level or pool",
             "function": "function"}
    for s in SETTINGS:
        if s.shown_default is not None:
            default = s.shown_default
        elif s.default is None:
            default = "required" if s.key == "functions" else "none"
        elif isinstance(s.default, (tuple, list)):
            default = "`[" + ", ".join(f'"{v}"' for v in s.default) + "]`"
        elif isinstance(s.default, dict):
            default = "`{}`"
        else:
            default = f"`{s.default}`"
        limit = getattr(s.parse, "limit", None)
        doc = f"{s.doc} {limit}" if limit else s.doc
        rows.append(f"| `{s.key}` | {where[s.scope]} | {default} | {doc} |")
    return "\n".join(rows)
