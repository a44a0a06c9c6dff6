"""Safe, restartable extraction of zip and tar archives.

Archives come from third-party hosts, so every member is checked before anything is
written: a member that could land outside the target folder (absolute path, `..`,
symlink, hardlink, device) refuses the whole archive, and so does one that would unpack
to more than a cap in total or expand far more than DomainBed's archives do (a zip bomb).
The sizes checked are the ones the archive declares, which are also what extraction
writes: zipfile stops a member at its declared size, tarfile copies exactly `size` bytes.
Extraction goes to a temporary folder renamed into place, so a crash never leaves a
half-extracted folder that looks done; tar members go through the standard library's
`data` filter as well (Python 3.11.4 or later, which pyproject.toml requires).
"""

from __future__ import annotations

import gzip
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rich.progress import Progress

from domainbed_reasoning.errors import UserError


@dataclass(frozen=True)
class ArchiveLimits:
    """DomainBed's largest archive (TerraIncognita's images) unpacks to under 7 GB, and images or
    JSON annotations expand at most about 20x; far more than that is not a dataset."""

    max_total_bytes: int = 64 * 1024**3
    max_ratio: float = 200.0


def unsafe_reason(name: str) -> str | None:
    """Why a member name could escape the target folder, or None when it cannot."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        return "absolute path"
    if ".." in PurePosixPath(posix).parts:
        return "'..' in path"
    return None


def _zip_reason(info: zipfile.ZipInfo) -> str | None:
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symlink"
    return unsafe_reason(info.filename)


def _tar_reason(member: tarfile.TarInfo) -> str | None:
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if not (member.isfile() or member.isdir()):
        return "special file"
    return unsafe_reason(member.name)


def _refuse(archive: Path, name: str, reason: str) -> UserError:
    return UserError(
        f"{archive.name}: refusing unsafe member {name!r} ({reason}); nothing was extracted: "
        f"get the archive from a trusted source"
    )


def archive_kind(archive: Path) -> str:
    if zipfile.is_zipfile(archive):
        return "zip"
    if tarfile.is_tarfile(archive):
        return "tar"
    raise UserError(f"{archive} is not a zip or tar archive: pass the original download")


def _check_sizes(archive: Path, total: int, limits: ArchiveLimits, into: Path) -> None:
    """Refuse before writing: too large in total, expanding like a bomb, or more than the disk holds."""
    ratio = total / max(archive.stat().st_size, 1)
    if total > limits.max_total_bytes:
        raise UserError(
            f"{archive.name}: unpacks to {total:,} bytes, over the {limits.max_total_bytes:,}-byte cap; "
            f"nothing was extracted: get the archive from a trusted source"
        )
    if ratio > limits.max_ratio:
        raise UserError(
            f"{archive.name}: would expand {ratio:,.0f}x (cap {limits.max_ratio:,.0f}x), like a zip bomb; "
            f"nothing was extracted: get the archive from a trusted source"
        )
    free = shutil.disk_usage(into).free
    if total > free:
        raise UserError(
            f"{archive.name} needs {total:,} bytes but the disk holding {into} has {free:,} free: "
            f"free space or pass --data-dir on a larger disk, then run again"
        )


def _extract_zip(archive: Path, into: Path, progress: Progress, limits: ArchiveLimits) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:
            reason = _zip_reason(info)
            if reason:
                raise _refuse(archive, info.filename, reason)
        total = sum(info.file_size for info in members)
        _check_sizes(archive, total, limits, into)
        task = progress.add_task(f"extract {archive.name}", total=total)
        for info in members:
            zf.extract(info, into)
            progress.advance(task, info.file_size)


def _extract_tar(archive: Path, into: Path, progress: Progress, limits: ArchiveLimits) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for member in members:
            reason = _tar_reason(member)
            if reason:
                raise _refuse(archive, member.name, reason)
        total = sum(member.size for member in members)
        _check_sizes(archive, total, limits, into)
        task = progress.add_task(f"extract {archive.name}", total=total)
        for member in members:
            tf.extract(member, into, filter="data")
            progress.advance(task, member.size)


def extract(
    archive: Path, target: Path, progress: Progress, limits: ArchiveLimits = ArchiveLimits()
) -> Path:
    """Extract `archive` into `target` (skipped when `target` exists: it was completed before)."""
    target = Path(target)
    if target.exists():
        return target
    extractor = _extract_zip if archive_kind(archive) == "zip" else _extract_tar
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        extractor(archive, tmp, progress, limits)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"{archive}: cannot extract ({type(err).__name__}: {err}): the file is damaged; "
            f"delete it and download it again"
        ) from err
    except BaseException:  # refused, the disk filled up, interrupted: no half-written folder stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(target)
    return target
