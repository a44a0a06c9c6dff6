"""The export folder -> a dataset repo on the Hugging Face Hub.

All transport is huggingface_hub's: `upload_folder` hashes, deduplicates, splits
big folders into several commits and resumes an interrupted upload when re-run
(in huggingface_hub 2.x it took over what `upload_large_folder` did, which is gone).
The token is never an argument here; huggingface_hub resolves it (HF_TOKEN, then
`hf auth login`), so it cannot end up in a file, a log line or shell history.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import filter_repo_objects, validate_repo_id
from rich.table import Table

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.hub.card import CARD_NAME, find_exported
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


def publish(
    folder: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Create the dataset repo if needed and upload the folder; returns the commit URL.

    Each published dataset's old shards are deleted in the same commit, so a re-export
    with a different shard count never leaves stale files for `load_dataset` to glob;
    other datasets already on the Hub are left alone.
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
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=plan.folder,
            repo_type="dataset",
            revision=revision,
            ignore_patterns=IGNORE_PATTERNS,
            delete_patterns=[f"{name}/*.parquet" for name in plan.configs],
            commit_message=f"Export DomainBed-Reasoning: {', '.join(plan.configs)}",
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
