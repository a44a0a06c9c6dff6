"""DomainBed's leave-one-domain-out protocol on top of DomainBed-Reasoning.

Training sees every domain but the target; each training domain is split with a
seeded shuffle into train and a `holdout_fraction` validation part (model selection
by training-domain validation, as DomainBed does); the target domain is the test
set. Works on the export folder and on a Hub repo alike, since both go through
`load_dataset`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets

from domainbed_reasoning import artefacts
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.errors import UserError


def _configs(path_or_repo: str) -> list[str]:
    try:
        return datasets.get_dataset_config_names(path_or_repo)
    except FileNotFoundError as err:
        raise UserError(
            f"no DomainBed-Reasoning at {path_or_repo!r}: pass the export folder (`dbr export`) or a Hub repo id"
        ) from err


def load_domains(
    path_or_repo: str | Path, dataset: str, cache_dir: str | Path | None = None
) -> datasets.DatasetDict:
    """One split per domain, exactly as published."""
    spec = get_spec(dataset)
    source = str(path_or_repo)
    configs = _configs(source)
    if spec.name not in configs:
        raise UserError(
            f"{source} has no {spec.name} config (it has {', '.join(configs)}): "
            f"export it with `dbr export {spec.name}`"
        )
    return datasets.load_dataset(source, spec.name, cache_dir=_cache_dir(source, cache_dir))


def _cache_dir(source: str, cache_dir: str | Path | None) -> str | None:
    """A local export folder gets a cache of its own, keyed on where and what its files are.

    `datasets` keys a local folder's cache on the folder's file patterns, not on the
    files, so a copy, a re-export or a rewritten shard would otherwise be served the
    rows of an earlier load. The key covers the folder's path and every file's name,
    size and modification time; it lives in the folder's hidden `.cache/` (never
    published).
    """
    if cache_dir is not None:
        return str(cache_dir)
    folder = Path(source)
    if not folder.is_dir():
        return None
    folder = folder.resolve()
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and ".cache" not in path.relative_to(folder).parts
    )
    digest = hashlib.sha256(str(folder).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return str(folder / ".cache" / "datasets" / digest.hexdigest()[:16])


def load_lodo(
    path_or_repo: str | Path,
    dataset: str,
    target_domain: str,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> datasets.DatasetDict:
    """`train`/`validation` from every domain but `target_domain`, `test` = `target_domain`.

    The target may be given as the domain ("Real World") or its split name ("Real_World").
    """
    if not 0 < holdout_fraction < 1:
        raise UserError(
            f"holdout_fraction must be between 0 and 1 (DomainBed uses 0.2), got {holdout_fraction}"
        )
    domains = load_domains(path_or_repo, dataset, cache_dir)
    target = artefacts.split_name(target_domain)
    if target not in domains:
        raise UserError(
            f"{get_spec(dataset).name} has no domain {target_domain!r} in {path_or_repo}: "
            f"choose one of {', '.join(domains)}"
        )
    sources = [name for name in domains if name != target]
    if not sources:
        raise UserError(
            f"{path_or_repo} holds only the domain {target_domain!r}: leave-one-domain-out needs two"
        )
    parts = []
    for name in sources:
        if domains[name].num_rows < 2:
            raise UserError(
                f"domain {name!r} has {domains[name].num_rows} row(s): too few to hold out a validation part"
            )
        parts.append(domains[name].train_test_split(test_size=holdout_fraction, seed=seed))
    return datasets.DatasetDict(
        {
            "train": datasets.concatenate_datasets([part["train"] for part in parts]),
            "validation": datasets.concatenate_datasets([part["test"] for part in parts]),
            "test": domains[target],
        }
    )
