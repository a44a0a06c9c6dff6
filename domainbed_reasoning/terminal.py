"""The two consoles every command prints to: results on stdout, progress and warnings on stderr.

A leaf module, so a stage can print its own summary without importing the CLI.
"""

from __future__ import annotations

from rich.console import Console

console = Console()
err_console = Console(stderr=True)
