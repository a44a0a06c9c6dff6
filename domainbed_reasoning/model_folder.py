"""Whether a model name is a Hub id or a folder on this machine, decided in one place.

The server, the inference engines and the processor loader all take a model by name; deciding
here means a name is read the same way everywhere, and a typo in a folder name stops with one
line before a download is tried under that name.
"""

from __future__ import annotations

from pathlib import Path

from domainbed_reasoning.errors import UserError


def is_local_model(model: str) -> bool:
    """A Hub id is `org/name`; anything else, or anything that exists here, is meant as a folder."""
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    return Path(model).expanduser().exists() or not looks_like_hub_id


def check_model_folder(model: str) -> None:
    """A name meant as a folder must be a saved model: a folder holding config.json."""
    if is_local_model(model) and not (Path(model).expanduser() / "config.json").is_file():
        raise UserError(
            f"model folder {model} not found or has no config.json: "
            "pass a saved model folder or a Hub id (org/name)"
        )
