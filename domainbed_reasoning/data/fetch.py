"""Resumable HTTP download of one source file.

DomainBed's archives are gigabytes behind slow academic and Google Drive links, so a
download survives interruption: bytes land in `<file>.part`, a re-run asks the server
for the rest (HTTP Range), and only a complete, verified file is renamed into place.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
from contextlib import closing
from pathlib import Path
from urllib.parse import urlencode, urljoin

import httpx
from rich.progress import Progress

from domainbed_reasoning.data.recipes import RemoteFile
from domainbed_reasoning.errors import UserError

MAX_CONFIRM_PAGES = 2
FALLBACK = "download it by hand and pass it with --from-archive PATH, or use --from-hub REPO"


def make_client() -> httpx.Client:
    """Connection failures are retried by the transport; a cut stream is resumed by a re-run."""
    return httpx.Client(
        transport=httpx.HTTPTransport(retries=3),
        follow_redirects=True,
        timeout=httpx.Timeout(30.0, read=300.0),
    )


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def file_checksum(path: Path, algorithm: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def verify(path: Path, remote: RemoteFile) -> None:
    """Size first (free), then the checksum; the caller discards a file that fails."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        raise UserError(
            f"{remote.filename}: got {size:,} bytes, expected {remote.size:,}: the source changed or the "
            f"file is corrupt; run again to re-download, or {FALLBACK}"
        )
    if remote.checksum is None:
        return
    algorithm, _, expected = remote.checksum.partition(":")
    actual = file_checksum(path, algorithm)
    if actual != expected.lower():
        raise UserError(
            f"{remote.filename}: {algorithm} is {actual}, expected {expected}: the source changed or the "
            f"file is corrupt; run again to re-download, or {FALLBACK}"
        )


def confirm_url(page: str, base_url: str, cookies: httpx.Cookies) -> str | None:
    """Google Drive answers large files with an "can't scan for viruses" page; find its button.

    Same three forms gdown recognises: the `download-form` with hidden inputs (current),
    an `export=download` link with a confirm token, and the `download_warning` cookie.
    """
    form = re.search(r'<form[^>]*id="download-form"[^>]*action="([^"]+)"', page)
    if form:
        inputs = re.findall(
            r'<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"', page
        )
        action = html.unescape(form.group(1))
        return f"{action}?{urlencode([(name, html.unescape(value)) for name, value in inputs])}"
    link = re.search(r'href="(/uc\?export=download[^"]+)"', page)
    if link:
        return urljoin(base_url, html.unescape(link.group(1)))
    token = next(
        (value for name, value in cookies.items() if name.startswith("download_warning")), None
    )
    if token:
        return str(httpx.URL(base_url).copy_merge_params({"confirm": token}))
    return None


def _page_title(page: str) -> str:
    title = re.search(r"<title>(.*?)</title>", page, re.DOTALL)
    return html.unescape(title.group(1)).strip() if title else "an HTML page"


def _open(client: httpx.Client, url: str, offset: int) -> httpx.Response:
    """Raw bytes only (no transfer compression), so a byte offset means the same on every try."""
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={offset}-"} if offset else {})
    request = client.build_request("GET", url, headers=headers)
    return client.send(request, stream=True)


def _response_for_file(client: httpx.Client, remote: RemoteFile, offset: int) -> httpx.Response:
    """Follow confirm pages until the server sends the file itself."""
    url = remote.url
    for _ in range(MAX_CONFIRM_PAGES + 1):
        response = _open(client, url, offset)
        if "text/html" not in response.headers.get("content-type", ""):
            return response
        page = response.read().decode(response.encoding or "utf-8", errors="replace")
        response.close()
        next_url = confirm_url(page, str(response.url), response.cookies)
        if next_url is None:
            raise UserError(
                f"{remote.filename}: {remote.url} sent {_page_title(page)!r} instead of the file "
                f"(link broken or quota exceeded): {FALLBACK}"
            )
        url = next_url
    raise UserError(f"{remote.filename}: {remote.url} keeps asking for confirmation: {FALLBACK}")


def _total_size(response: httpx.Response, offset: int) -> int | None:
    content_range = response.headers.get("content-range", "")
    if "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("content-length")
    return offset + int(length) if length is not None else None


def _stream_to_part(
    client: httpx.Client, remote: RemoteFile, part: Path, progress: Progress
) -> None:
    offset = part.stat().st_size if part.exists() else 0
    response = _response_for_file(client, remote, offset)
    with closing(response):
        if response.status_code == 416 and offset:
            if _total_size(response, offset) not in (None, offset):
                part.unlink()
                raise UserError(
                    f"{remote.filename}: the partial download is larger than the file on the server; "
                    f"it was removed, run again to start over"
                )
            return
        if response.status_code >= 400:
            raise UserError(
                f"{remote.filename}: {remote.url} answered HTTP {response.status_code}: the link may be "
                f"broken; {FALLBACK}"
            )
        if response.status_code != 206:
            offset = 0
        task = progress.add_task(
            remote.filename, total=_total_size(response, offset), completed=offset
        )
        with open(part, "ab" if offset else "wb") as handle:
            for chunk in response.iter_raw():
                handle.write(chunk)
                progress.advance(task, len(chunk))
            handle.flush()
            os.fsync(handle.fileno())


def fetch(remote: RemoteFile, dest: Path, client: httpx.Client, progress: Progress) -> Path:
    """Download `remote` to `dest`, resuming `dest.part`; a present `dest` was verified before."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    try:
        _stream_to_part(client, remote, part, progress)
    except httpx.HTTPError as err:
        raise UserError(
            f"{remote.filename}: download from {remote.url} interrupted ({type(err).__name__}: {err}); "
            f"run the same command again to resume"
        ) from err
    try:
        verify(part, remote)
    except UserError:
        part.unlink()
        raise
    os.replace(part, dest)
    return dest
