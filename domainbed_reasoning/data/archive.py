"""Safe, restartable extraction of zip and tar archives.

Archives come from third-party hosts, so every member is checked before anything is
written: a member that could land outside the target folder (absolute path, `..`,
symlink, hardlink, device) refuses the whole archive. Extraction goes to a temporary
folder renamed into place, so a crash never leaves a half-extracted folder that looks done.
"""

from __future__ import annotations

import gzip
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from rich.progress import Progress

from domainbed_reasoning.errors import UserError


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


def _extract_zip(archive: Path, into: Path, progress: Progress) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:
            reason = _zip_reason(info)
            if reason:
                raise _refuse(archive, info.filename, reason)
        task = progress.add_task(
            f"extract {archive.name}", total=sum(info.file_size for info in members)
        )
        for info in members:
            zf.extract(info, into)
            progress.advance(task, info.file_size)


def _extract_tar(archive: Path, into: Path, progress: Progress) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for member in members:
            reason = _tar_reason(member)
            if reason:
                raise _refuse(archive, member.name, reason)
        task = progress.add_task(
            f"extract {archive.name}", total=sum(member.size for member in members)
        )
        for member in members:
            tf.extract(member, into, filter="data")
            progress.advance(task, member.size)


def extract(archive: Path, target: Path, progress: Progress) -> Path:
    """Extract `archive` into `target` (skipped when `target` exists: it was completed before)."""
    target = Path(target)
    if target.exists():
        return target
    extractor = _extract_zip if archive_kind(archive) == "zip" else _extract_tar
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        extractor(archive, tmp, progress)
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"{archive}: cannot extract ({type(err).__name__}: {err}): the file is damaged; "
            f"delete it and download it again"
        ) from err
    tmp.rename(target)
    return target
