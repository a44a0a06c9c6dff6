"""The export folder -> a dataset repo on the Hugging Face Hub.

All transport is huggingface_hub's: `upload_folder` is its path for large folders in 2.x (it took
over what `upload_large_folder` did, which is gone): with `hf_xet` (a dependency) Parquet files go
to Xet storage, chunked and deduplicated, big folders are split into several commits, and an
interrupted upload resumes when re-run.

A repo may already hold datasets published from other folders. The card's YAML `configs` are what
`load_dataset(repo, NAME)` reads, so the card uploaded is merged: the datasets of this folder plus
those already on the Hub (described from their card entry and their `build.json`), never only the
local ones. The data goes first and the card second: the card's file patterns are globs, so
between the two commits every config on the Hub still loads.

The token is never an argument here; huggingface_hub resolves it (HF_TOKEN, then
`hf auth login`), so it cannot end up in a file, a log line or shell history.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx2
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCard, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import filter_repo_objects, validate_repo_id
from rich.table import Table

from domainbed_reasoning import artefacts
from domainbed_reasoning.data.registry import REGISTRY
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.hub.card import (
    CARD_NAME,
    ExportedDataset,
    card_default,
    card_text,
    choose_default,
    find_exported,
    folder_default,
    published_dataset,
)
from domainbed_reasoning.terminal import console

# Hidden paths are export staging folders and tool caches, never part of the dataset.
IGNORE_PATTERNS = [".*", "*/.*"]


@dataclass(frozen=True)
class PublishPlan:
    folder: Path
    files: tuple[tuple[str, int], ...]  # (path in repo, bytes)
    configs: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def plan_publish(folder: Path) -> PublishPlan:
    """What would be uploaded; refuses a folder that is not a finished export."""
    folder = Path(folder)
    if not (folder / CARD_NAME).is_file():
        raise UserError(
            f"{folder} is not an export folder (no {CARD_NAME}): run `dbr export DATASET --out {folder}` first"
        )
    exported = find_exported(folder)
    if not exported:
        raise UserError(
            f"{folder} holds no exported dataset: run `dbr export DATASET --out {folder}` first"
        )
    paths = sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()
    )
    kept = filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS)
    return PublishPlan(
        folder=folder,
        files=tuple((path, (folder / path).stat().st_size) for path in kept),
        configs=tuple(item.spec.name for item in exported),
    )


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(
            f"--repo-id {repo_id!r} is not a Hub repo id: use USER/domainbed-reasoning"
        ) from err
    if repo_id.count("/") != 1:
        raise UserError(f"--repo-id {repo_id!r} needs an owner: use USER/{repo_id}")


def _hub_error(err: HfHubHTTPError, repo_id: str) -> UserError:
    status = err.response.status_code if err.response is not None else "no response"
    reason = " ".join(
        (err.server_message or str(err)).split()
    )  # one line, whatever the server sent
    if status in (401, 403):
        return UserError(
            f"the Hub refused access to dataset {repo_id} (HTTP {status}): "
            "use a token with write access (`hf auth login` or HF_TOKEN)"
        )
    return UserError(f"publishing dataset {repo_id} failed (HTTP {status}): {reason}")


def _read(api: HfApi, repo_id: str, path: str, revision: str | None, into: Path) -> str:
    local = api.hf_hub_download(
        repo_id, path, repo_type="dataset", revision=revision, local_dir=into
    )
    return Path(local).read_text(encoding="utf-8")


def already_published(
    api: HfApi, repo_id: str, revision: str | None, replaced: tuple[str, ...]
) -> tuple[list[ExportedDataset], str | None]:
    """The datasets on the Hub that this upload leaves in place, read back from the repo's card,
    and the card's default config (kept, so a new dataset never changes what an unnamed
    `load_dataset(repo)` returns).

    A config whose Parquet files are gone is dropped (it could not load anyway); one this toolkit
    did not publish (no `build.json`, or not a dataset it knows) stops the upload, since the card
    could not describe it truthfully.
    """
    files = {
        entry.path: entry.size
        for entry in api.list_repo_tree(
            repo_id, repo_type="dataset", revision=revision, recursive=True
        )
        if isinstance(entry, RepoFile)
    }
    if CARD_NAME not in files:
        return [], None
    found = []
    with tempfile.TemporaryDirectory(prefix="dbr-card-") as tmp:
        card = DatasetCard(_read(api, repo_id, CARD_NAME, revision, Path(tmp)))
        infos = DatasetInfosDict.from_dataset_card_data(card.data)
        for config in card.data.get("configs") or []:
            name = config["config_name"]
            if name in replaced or not any(
                path.startswith(f"{name}/") and path.endswith(".parquet") for path in files
            ):
                continue
            spec = REGISTRY.get(name)
            facts = artefacts.build_facts_path(Path(name)).as_posix()
            if spec is None or facts not in files or name not in infos:
                raise UserError(
                    f"dataset {repo_id} has a config {name!r} that `dbr publish` did not write "
                    f"(no {facts} or card entry): publish to another repo, or remove it there first"
                )
            build = json.loads(_read(api, repo_id, facts, revision, Path(tmp)))
            found.append(published_dataset(spec, infos[name], build, files))
    return found, card_default(str(card))


def publish(
    folder: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Create the dataset repo if needed and upload the folder; returns the commit URL.

    Each published dataset's old shards are deleted in the same commit as its new ones, so a
    re-export with a different shard count never leaves stale files for `load_dataset` to glob;
    other datasets already on the Hub keep their files and their place in the card.
    """
    plan = plan_publish(folder)
    _check_repo_id(repo_id)
    if get_token() is None:
        raise UserError(
            "no Hugging Face token: run `hf auth login` or set HF_TOKEN, then publish again"
        )
    api = HfApi(endpoint=endpoint)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        kept, hub_default = already_published(api, repo_id, revision, plan.configs)
        described = find_exported(plan.folder) + kept
        default = choose_default(described, hub_default, folder_default(plan.folder))
        api.upload_folder(
            repo_id=repo_id,
            folder_path=plan.folder,
            repo_type="dataset",
            revision=revision,
            ignore_patterns=[*IGNORE_PATTERNS, CARD_NAME],
            delete_patterns=[f"{name}/*.parquet" for name in plan.configs],
            commit_message=f"Export DomainBed-Reasoning: {', '.join(plan.configs)}",
        )
        commit = api.upload_file(
            path_or_fileobj=card_text(described, default).encode(),
            path_in_repo=CARD_NAME,
            repo_id=repo_id,
            repo_type="dataset",
            revision=revision,
            commit_message=f"Dataset card: {', '.join(item.spec.name for item in described)}",
        )
    except HfHubHTTPError as err:
        raise _hub_error(err, repo_id) from err
    except httpx2.TransportError as err:  # huggingface_hub's HTTP client: no connection at all
        raise UserError(
            f"cannot reach the Hub at {api.endpoint} ({err}): check the network, or HF_ENDPOINT if set"
        ) from err
    return commit.commit_url


def publish_or_plan(
    folder: Path, repo_id: str, private: bool = False, revision: str | None = None, dry_run: bool = False
) -> str | None:
    """`dbr publish`: upload and print the URL, or with `dry_run` list what would go and upload nothing."""
    if not dry_run:
        url = publish(folder, repo_id, private=private, revision=revision)
        console.print(f"[green]published[/] {folder} to {repo_id}: {url}", highlight=False)
        return url
    plan = plan_publish(folder)
    table = Table(title=f"{folder} -> {repo_id} (dry run)")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    for path, size in plan.files:
        table.add_row(path, f"{size:,}")
    console.print(table)
    console.print(
        f"{len(plan.files)} files, {plan.total_bytes:,} bytes in total; nothing uploaded", highlight=False
    )
    return None
