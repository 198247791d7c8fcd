"""``compress methods``: every registered method with its options, flags and defaults (from the registry).

Examples
--------
``compress methods`` prints one table per method; ``compress methods --json`` prints the same as JSON.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from ..methods import REGISTRY
from ..methods.chain import Chain

HELP = "List every compression method with its options, flags and defaults.\n\nExample: compress methods --json"


def describe_methods() -> list[dict[str, Any]]:
    """One entry per registered method (and the chain options): name, summary, metrics, data needs, options."""
    out = []
    for cls in [REGISTRY.get(n) for n in REGISTRY.names()] + [Chain]:
        out.append({
            "name": cls.name if cls is not Chain else "a+b (chain)", "summary": cls.summary,
            "default_metric": cls.default_metric if cls is not Chain else "the last method's",
            "metrics": list(cls.metrics), "requires_data": bool(cls.requires_data),
            "options": [{"flag": s.flag, "type": s.kind, "default": s.default, "choices": list(s.choices),
                         "help": s.help, "example": s.example} for s in cls.option_specs()],
        })
    return out


def methods_command(json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
                    = False) -> None:
    """List the methods."""
    described = describe_methods()
    if json_output:
        typer.echo(json.dumps(described, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for m in described:
        needs = "needs --data" if m["requires_data"] else "data-free"
        table = Table(title=f"{m['name']}: {m['summary']} ({needs}; target in {', '.join(m['metrics'])}, "
                            f"default {m['default_metric']})", title_justify="left")
        for col in ("flag", "type", "default", "help"):
            table.add_column(col)
        for o in m["options"]:
            choices = f" ({', '.join(o['choices'])})" if o["choices"] else ""
            table.add_row(o["flag"], o["type"], str(o["default"]), o["help"] + choices)
        console.print(table if m["options"] else table.title)


def register(app: typer.Typer) -> None:
    """Add ``methods`` to ``app``."""
    app.command("methods", help=HELP)(methods_command)
