"""`dbr`: one command per stage of DESIGN.md's data flow.

Commands stay thin: they parse options, call the stage's library function and
print. Every `UserError` becomes one red line and exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError
from .registry import SPECS, get_spec

app = typer.Typer(
    name="dbr",
    help="Build DomainBed-Reasoning and train MLLMs on it with RD-MLDG.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()
err_console = Console(stderr=True)


@app.command()
def datasets(as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON.")) -> None:
    """List the DomainBed datasets this toolkit knows: folders, domains, classes."""
    if as_json:
        typer.echo(json.dumps([spec.to_json() for spec in SPECS], indent=2))
        return
    table = Table(title="DomainBed datasets")
    for column in ("name", "folder", "domains", "classes", "images"):
        table.add_column(column)
    for spec in SPECS:
        table.add_row(
            spec.name,
            spec.dirname,
            ", ".join(spec.domains),
            f"{len(spec.classes)}: {', '.join(spec.classes[:5])}{', ...' if len(spec.classes) > 5 else ''}",
            f"{spec.num_images:,}" if spec.num_images else "generated",
        )
    console.print(table)


@app.command()
def scan(
    dataset: str = typer.Argument(..., help="Dataset name, e.g. PACS (see `dbr datasets`)."),
    data_dir: Path = typer.Option(Path("data"), help="Folder holding <dirname>/<domain>/<class>/<image>."),
    out: Path = typer.Option(Path("manifest.parquet"), help="Where to write the Parquet manifest."),
) -> None:
    """Walk a DomainBed folder and write its manifest: one row per image."""
    from .scan import scan_dataset, write_manifest

    result = scan_dataset(get_spec(dataset), data_dir)
    write_manifest(result, out)
    for domain, count in result.counts().items():
        console.print(f"  {domain}: {count:,} images")
    for bad in result.skipped[:20]:
        err_console.print(f"[yellow]skipped[/] {bad.path}: {bad.reason}", highlight=False)
    if len(result.skipped) > 20:
        err_console.print(f"[yellow]... and {len(result.skipped) - 20} more skipped files[/]")
    console.print(
        f"[green]wrote[/] {out} ({result.frame.height:,} images, {len(result.skipped)} skipped)", highlight=False
    )


def main() -> None:
    try:
        app()
    except UserError as err:
        err_console.print(f"[bold red]error:[/] {err}", soft_wrap=True, highlight=False)
        sys.exit(2)
