"""Every generated document (the dataset card, the model card, the chain browser's page) is a
Jinja template shipped beside the code that fills it, so its text reads as it will appear.

One environment for all of them: a value the code forgot to pass is an error, never an empty
string; HTML is escaped and Markdown is not; block tags take their own line with them, so a
template's loops and conditions can sit on lines of their own; the file's last newline is kept.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2


@cache
def environment(package: str) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader(package, "."),
        autoescape=jinja2.select_autoescape(["html.j2"], default_for_string=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(package: str, name: str, **values: Any) -> str:
    """Template `name` of `package` (the folder of that package's modules), filled with `values`."""
    return environment(package).get_template(name).render(**values)
