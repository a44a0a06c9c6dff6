"""`dbr download` against a real HTTP server on 127.0.0.1 and real archives built here."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import datasets
import httpx
import pytest
from PIL import Image
from rich.progress import Progress

from domainbed_reasoning.data.archive import ArchiveLimits, extract
from domainbed_reasoning.data.download import MARKER, STAGING, download_dataset, staging_dir
from domainbed_reasoning.data.fetch import confirm_url, part_path
from domainbed_reasoning.data.recipes import (
    DOMAINBED_COMMIT,
    RECIPES,
    TERRA_ANNOTATIONS,
    TERRA_IMAGES,
    RemoteFile,
    get_recipe,
)
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.data.scan import scan_dataset
from domainbed_reasoning.errors import UserError

PACS = get_spec("PACS")


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 7 % 256, seed * 13 % 256, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tar_gz_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def pacs_archive() -> bytes:
    """PACS.zip as DomainBed's Drive copy holds it: `kfold/<domain>/<class>/<image>`."""
    members = {
        f"kfold/{domain}/{cls}/pic_{d}{c}.jpg": jpeg(d * 10 + c)
        for d, domain in enumerate(PACS.domains)
        for c, cls in enumerate(PACS.classes)
    }
    return zip_bytes(members)


@dataclass
class Served:
    """What the local server hands out and what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    pages: dict[str, str] = field(default_factory=dict)
    cut_after: int | None = None
    ranges: list[str | None] = field(default_factory=list)
    hits: list[str] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    served: Served

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        served = self.server.served  # type: ignore[attr-defined]
        url = urlparse(self.path)
        served.hits.append(self.path)
        if url.path in served.pages:
            return self._send(200, served.pages[url.path].encode(), "text/html; charset=utf-8")
        key = url.path + ("?confirm" if "confirm" in parse_qs(url.query) else "")
        data = served.files.get(key) or served.files.get(url.path)
        if data is None:
            return self._send(404, b"not found", "text/plain")
        served.ranges.append(self.headers.get("Range"))
        start = (
            int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        )
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if served.cut_after is not None:
            body, served.cut_after = body[: served.cut_after], None
            self.close_connection = True
        self.wfile.write(body)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.served = Served()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def base_url(httpd: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def pacs_source(url: str, data: bytes, **overrides: object) -> object:
    remote = replace(
        RECIPES["PACS"].files[0],
        url=url,
        checksum=f"sha256:{hashlib.sha256(data).hexdigest()}",
        **overrides,
    )
    return replace(RECIPES["PACS"], files=(remote,))


def assert_pacs_layout(data_dir: Path) -> None:
    result = scan_dataset(PACS, data_dir)
    assert result.counts() == {domain: len(PACS.classes) for domain in PACS.domains}
    assert (data_dir / "PACS" / "art_painting" / "dog" / "pic_00.jpg").is_file()
    assert not (data_dir / STAGING).exists()


def test_http_download_builds_domainbed_layout_and_reruns_as_noop(server, tmp_path):
    data = pacs_archive()
    server.served.files["/PACS.zip"] = data
    source = pacs_source(f"{base_url(server)}/PACS.zip", data)

    result = download_dataset(PACS, tmp_path, source=source)

    assert (result.origin, result.files, result.skipped) == ("http", 28, False)
    assert_pacs_layout(tmp_path)
    assert json.loads((tmp_path / "PACS" / MARKER).read_text())["origin"] == "http"
    hits = len(server.served.hits)
    again = download_dataset(PACS, tmp_path, source=source)
    assert again.skipped and again.files == 28
    assert len(server.served.hits) == hits


def test_interrupted_download_resumes_with_range(server, tmp_path):
    data = pacs_archive()
    server.served.files["/PACS.zip"] = data
    server.served.cut_after = len(data) // 3
    source = pacs_source(f"{base_url(server)}/PACS.zip", data)

    with pytest.raises(
        UserError, match=r"PACS.zip: download from .* interrupted .*run the same command again"
    ):
        download_dataset(PACS, tmp_path, source=source)
    part = part_path(staging_dir(tmp_path, PACS) / "archives" / "PACS.zip")
    assert part.stat().st_size == len(data) // 3

    download_dataset(PACS, tmp_path, source=source)
    assert server.served.ranges == [None, f"bytes={len(data) // 3}-"]
    assert_pacs_layout(tmp_path)


def test_complete_part_file_is_finished_without_refetching(server, tmp_path):
    data = pacs_archive()
    server.served.files["/PACS.zip"] = data
    part = part_path(staging_dir(tmp_path, PACS) / "archives" / "PACS.zip")
    part.parent.mkdir(parents=True)
    part.write_bytes(data)

    download_dataset(PACS, tmp_path, source=pacs_source(f"{base_url(server)}/PACS.zip", data))
    assert server.served.ranges == [f"bytes={len(data)}-"]
    assert_pacs_layout(tmp_path)


def test_part_file_longer_than_the_source_is_dropped(server, tmp_path):
    data = pacs_archive()
    server.served.files["/PACS.zip"] = data
    part = part_path(staging_dir(tmp_path, PACS) / "archives" / "PACS.zip")
    part.parent.mkdir(parents=True)
    part.write_bytes(data + b"junk")
    source = pacs_source(f"{base_url(server)}/PACS.zip", data)

    with pytest.raises(
        UserError, match=r"PACS.zip: the partial download is larger than the file on the server"
    ):
        download_dataset(PACS, tmp_path, source=source)
    assert not part.exists()
    download_dataset(PACS, tmp_path, source=source)
    assert_pacs_layout(tmp_path)


def test_checksum_mismatch_is_refused_and_the_bad_file_dropped(server, tmp_path):
    data = pacs_archive()
    server.served.files["/PACS.zip"] = data
    source = pacs_source(f"{base_url(server)}/PACS.zip", b"other bytes")

    with pytest.raises(
        UserError, match=r"PACS.zip: sha256 is [0-9a-f]{64}, expected [0-9a-f]{64}: .*corrupt"
    ):
        download_dataset(PACS, tmp_path, source=source)
    archives = staging_dir(tmp_path, PACS) / "archives"
    assert list(archives.iterdir()) == []
    assert not (tmp_path / "PACS").exists()


def test_size_mismatch_is_refused(server, tmp_path):
    data = pacs_archive()
    server.served.files["/PACS.zip"] = data
    source = pacs_source(f"{base_url(server)}/PACS.zip", data, size=len(data) + 1)
    with pytest.raises(
        UserError, match=rf"PACS.zip: got {len(data):,} bytes, expected {len(data) + 1:,}"
    ):
        download_dataset(PACS, tmp_path, source=source)


def test_google_drive_confirm_page_is_followed(server, tmp_path):
    data = pacs_archive()
    base = base_url(server)
    server.served.pages["/uc"] = (
        "<html><title>Google Drive - Virus scan warning</title><body>"
        f'<form id="download-form" action="{base}/download" method="get">'
        '<input type="hidden" name="id" value="abc"><input type="hidden" name="confirm" value="t">'
        '<input type="hidden" name="uuid" value="u-1&amp;2"></form></body></html>'
    )
    server.served.files["/download?confirm"] = data

    download_dataset(PACS, tmp_path, source=pacs_source(f"{base}/uc?id=abc", data))
    assert server.served.hits[1] == "/download?id=abc&confirm=t&uuid=u-1%262"
    assert_pacs_layout(tmp_path)


def test_confirm_url_understands_the_older_drive_link():
    page = '<a id="uc-download-link" href="/uc?export=download&amp;confirm=XyZ&amp;id=abc">Download</a>'
    url = confirm_url(page, "https://drive.google.com/uc?id=abc", httpx.Cookies())
    assert url == "https://drive.google.com/uc?export=download&confirm=XyZ&id=abc"


def test_confirm_url_falls_back_to_the_download_warning_cookie():
    cookies = httpx.Cookies({"download_warning_13058876669334088843_abc": "T0k"})
    assert confirm_url("<html></html>", "https://drive.google.com/uc?id=abc", cookies) == (
        "https://drive.google.com/uc?id=abc&confirm=T0k"
    )
    assert (
        confirm_url("<html></html>", "https://drive.google.com/uc?id=abc", httpx.Cookies()) is None
    )


def test_html_instead_of_file_names_the_page_and_the_fix(server, tmp_path):
    server.served.pages["/uc"] = "<html><title>Google Drive - Quota exceeded</title></html>"
    source = pacs_source(f"{base_url(server)}/uc?id=abc", b"")
    with pytest.raises(
        UserError,
        match=r"sent 'Google Drive - Quota exceeded' instead of the file .*--from-archive",
    ):
        download_dataset(PACS, tmp_path, source=source)


def test_http_error_status_names_the_url(server, tmp_path):
    source = pacs_source(f"{base_url(server)}/gone.zip", b"")
    with pytest.raises(
        UserError, match=r"PACS.zip: http://127.0.0.1:\d+/gone.zip answered HTTP 404"
    ):
        download_dataset(PACS, tmp_path, source=source)


def _zip_with_symlink(name: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("kfold/ok.txt", b"ok")
        info = zipfile.ZipInfo(name)
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _tar_with_link(name: str, kind: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, "/etc/passwd"
        tf.addfile(info)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("filename", "data", "member", "reason"),
    [
        (
            "evil.zip",
            zip_bytes({"kfold/a.txt": b"a", "../escape.txt": b"x"}),
            "../escape.txt",
            "'..' in path",
        ),
        (
            "evil.zip",
            zip_bytes({"kfold/../../escape.txt": b"x"}),
            "kfold/../../escape.txt",
            "'..' in path",
        ),
        ("evil.zip", zip_bytes({"/etc/cron.d/x": b"x"}), "/etc/cron.d/x", "absolute path"),
        ("evil.zip", _zip_with_symlink("kfold/link"), "kfold/link", "symlink"),
        (
            "evil.tar.gz",
            tar_gz_bytes({"../../escape.txt": b"x"}),
            "../../escape.txt",
            "'..' in path",
        ),
        ("evil.tar", _tar_with_link("kfold/link", tarfile.SYMTYPE), "kfold/link", "symlink"),
        ("evil.tar", _tar_with_link("kfold/hard", tarfile.LNKTYPE), "kfold/hard", "hardlink"),
    ],
)
def test_unsafe_members_refuse_the_whole_archive(tmp_path, filename, data, member, reason):
    archive = tmp_path / filename
    archive.write_bytes(data)
    target = tmp_path / "out" / "unpacked"
    with pytest.raises(
        UserError, match=rf"{filename}: refusing unsafe member '{member}' \({reason}\)"
    ):
        extract(archive, target, Progress(disable=True))
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "escape.txt").exists()


def test_unsafe_archive_via_from_archive_leaves_no_dataset(tmp_path):
    archive = tmp_path / "PACS.zip"
    archive.write_bytes(zip_bytes({"kfold/../../../x.txt": b"x"}))
    with pytest.raises(UserError, match=r"refusing unsafe member 'kfold/../../../x.txt'"):
        download_dataset(PACS, tmp_path / "data", from_archive=[archive])
    assert not (tmp_path / "data" / "PACS").exists()


def test_from_archive_skips_http_and_keeps_the_users_file(tmp_path):
    archive = tmp_path / "my-pacs-copy.zip"
    archive.write_bytes(pacs_archive())
    result = download_dataset(PACS, tmp_path / "data", from_archive=[archive])
    assert result.origin == "archive"
    assert_pacs_layout(tmp_path / "data")
    assert archive.is_file()


def test_officehome_archive_folder_is_renamed(tmp_path):
    spec = get_spec("OfficeHome")
    archive = tmp_path / "office_home.zip"
    archive.write_bytes(
        zip_bytes(
            {
                f"OfficeHomeDataset_10072016/{d}/{c}/00001.jpg": jpeg(i)
                for i, d in enumerate(spec.domains)
                for c in spec.classes[:2]
            }
            | {"OfficeHomeDataset_10072016/ImageInfo.csv": b"x"}
        )
    )
    download_dataset(spec, tmp_path, from_archive=[archive])
    assert (tmp_path / "office_home" / "Real World" / "Alarm_Clock" / "00001.jpg").is_file()


def test_wrong_archive_names_the_missing_folder(tmp_path):
    archive = tmp_path / "PACS.zip"
    archive.write_bytes(zip_bytes({"pacs_data/photo/dog/1.jpg": jpeg(1)}))
    with pytest.raises(
        UserError, match=r"PACS.zip has no folder 'kfold': it is not the archive DomainBed uses"
    ):
        download_dataset(PACS, tmp_path / "data", from_archive=[archive])


def test_not_an_archive_is_refused(tmp_path):
    bogus = tmp_path / "PACS.zip"
    bogus.write_text("<html>quota exceeded</html>")
    with pytest.raises(UserError, match=r"PACS.zip is not a zip or tar archive"):
        download_dataset(PACS, tmp_path / "data", from_archive=[bogus])


def terra_files(folder: Path) -> None:
    coco = {
        "categories": [
            {"id": 1, "name": "bird"},
            {"id": 2, "name": "coyote"},
            {"id": 3, "name": "deer"},
            {"id": 4, "name": "empty"},
        ],
        "images": [
            {"id": "a", "file_name": "a.jpg", "location": "38"},
            {"id": "b", "file_name": "b.jpg", "location": 100},
            {"id": "c", "file_name": "c.jpg", "location": "7"},
            {"id": "d", "file_name": "d.jpg", "location": "46"},
            {"id": "e", "file_name": "e.jpg", "location": "43"},
        ],
        "annotations": [
            {"image_id": "a", "category_id": 1},
            {"image_id": "b", "category_id": 2},
            {"image_id": "b", "category_id": 4},
            {"image_id": "c", "category_id": 1},
            {"image_id": "d", "category_id": 3},
        ],
    }
    images = {f"eccv_18_all_images_sm/{name}.jpg": jpeg(i) for i, name in enumerate("abcde")}
    (folder / TERRA_IMAGES).write_bytes(tar_gz_bytes(images))
    (folder / TERRA_ANNOTATIONS).write_bytes(
        zip_bytes({"caltech_images_20210113.json": json.dumps(coco).encode()})
    )


@pytest.fixture
def lila(tmp_path: Path) -> Path:
    """A folder to put LILA's files in, as a user would before `--from-archive`."""
    folder = tmp_path / "lila"
    folder.mkdir()
    return folder


def test_terra_incognita_is_built_from_coco_annotations(tmp_path, lila):
    terra_files(lila)
    result = download_dataset(get_spec("TerraIncognita"), tmp_path / "data", from_archive=[lila])
    root = tmp_path / "data" / "terra_incognita"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    assert files == [
        "location_100/coyote/b.jpg",
        "location_100/empty/b.jpg",
        "location_38/bird/a.jpg",
    ]
    assert result.files == 3


def test_terra_incognita_missing_image_is_named(tmp_path, lila):
    terra_files(lila)
    (lila / TERRA_IMAGES).write_bytes(tar_gz_bytes({"eccv_18_all_images_sm/b.jpg": jpeg(1)}))
    with pytest.raises(
        UserError, match=r"image 'a.jpg' listed in caltech_images_20210113.json is missing"
    ):
        download_dataset(get_spec("TerraIncognita"), tmp_path / "data", from_archive=[lila])


def test_domainnet_duplicates_are_removed(tmp_path):
    spec = get_spec("DomainNet")
    sources = tmp_path / "visda"
    sources.mkdir()
    for domain in spec.domains:
        members = {
            f"{domain}/aircraft_carrier/{domain}_001_000001.jpg": jpeg(1),
            f"{domain}/zigzag/{domain}_345_000002.jpg": jpeg(2),
        }
        (sources / f"{domain}.zip").write_bytes(zip_bytes(members))
    (sources / "domain_net_duplicates.txt").write_text(
        "clipart/zigzag/clipart_345_000002.jpg\nreal/aircraft_carrier/not_there.jpg\n"
    )
    result = download_dataset(spec, tmp_path / "data", from_archive=[sources])
    root = tmp_path / "data" / "domain_net"
    assert not (root / "clipart" / "zigzag" / "clipart_345_000002.jpg").exists()
    assert (root / "sketch" / "zigzag" / "sketch_345_000002.jpg").is_file()
    assert result.files == 11


def test_from_archive_missing_files_are_listed(tmp_path):
    only = tmp_path / TERRA_IMAGES
    only.write_bytes(b"x")
    with pytest.raises(
        UserError, match=rf"--from-archive lacks {TERRA_ANNOTATIONS} for TerraIncognita"
    ):
        download_dataset(get_spec("TerraIncognita"), tmp_path / "data", from_archive=[only])


def test_from_archive_with_a_foreign_name_is_refused(tmp_path):
    other = tmp_path / "photos.zip"
    other.write_bytes(b"x")
    with pytest.raises(
        UserError, match=r"--from-archive .*photos.zip: DomainNet needs files named clipart.zip"
    ):
        download_dataset(get_spec("DomainNet"), tmp_path / "data", from_archive=[other])


def test_from_archive_path_must_exist(tmp_path):
    with pytest.raises(UserError, match=r"--from-archive .*nope.zip: no such file or folder"):
        download_dataset(PACS, tmp_path, from_archive=[tmp_path / "nope.zip"])


def test_both_sources_given_is_refused(tmp_path):
    with pytest.raises(
        UserError, match=r"--from-archive and --from-hub both given: choose one source"
    ):
        download_dataset(PACS, tmp_path, from_archive=[tmp_path], from_hub="flwrlabs/pacs")


def test_existing_folder_without_marker_is_not_overwritten(tmp_path):
    (tmp_path / "PACS" / "photo").mkdir(parents=True)
    with pytest.raises(
        UserError, match=r"PACS exists but was not completed by `dbr download`.*remove it"
    ):
        download_dataset(PACS, tmp_path)


def test_synthdg_has_no_download_source():
    with pytest.raises(UserError, match=r"SynthDG is not downloaded: generate it with `dbr synth`"):
        get_recipe("SynthDG")


def test_every_source_file_is_declared_once():
    for source in RECIPES.values():
        names = [remote.filename for remote in source.files]
        assert len(names) == len(set(names))
        for remote in source.files:
            assert isinstance(remote, RemoteFile)
            assert remote.checksum is None or remote.checksum.split(":")[0] in {"md5", "sha256"}


def hub_copy(folder: Path, domains: list[str], labels: list[int], names: list[str]) -> Path:
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "domain": datasets.Value("string"),
            "label": datasets.ClassLabel(names=names),
        }
    )
    images = [Image.open(io.BytesIO(jpeg(i))) for i in range(len(domains))]
    table = datasets.Dataset.from_dict(
        {"image": images, "domain": domains, "label": labels}, features=features
    )
    (folder / "data").mkdir(parents=True)
    table.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def test_from_hub_maps_labels_and_domains_to_the_registry(tmp_path):
    names = ["Dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    repo = hub_copy(
        tmp_path / "pacs-copy", ["art_painting", "Photo", "sketch", "cartoon"], [0, 6, 1, 0], names
    )

    result = download_dataset(PACS, tmp_path / "data", from_hub=str(repo))

    root = tmp_path / "data" / "PACS"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    assert files == [
        "art_painting/dog/train-000000.jpg",
        "cartoon/dog/train-000003.jpg",
        "photo/person/train-000001.jpg",
        "sketch/elephant/train-000002.jpg",
    ]
    assert (root / "art_painting" / "dog" / "train-000000.jpg").read_bytes() == jpeg(0)
    assert result.origin == f"hub:{repo}" and result.files == 4


def test_from_hub_unknown_domain_is_named(tmp_path):
    repo = hub_copy(tmp_path / "copy", ["clipart"], [0], ["dog", "elephant"])
    with pytest.raises(
        UserError,
        match=r"domain 'clipart' is not in PACS's registry \(art_painting, cartoon, photo, sketch\)",
    ):
        download_dataset(PACS, tmp_path / "data", from_hub=str(repo))


def test_from_hub_unknown_class_is_named(tmp_path):
    repo = hub_copy(tmp_path / "copy", ["photo"], [1], ["dog", "zebra"])
    with pytest.raises(
        UserError,
        match=r"class 'zebra' is not in PACS's registry \(dog, .*\): .*pass the matching DATASET",
    ):
        download_dataset(PACS, tmp_path / "data", from_hub=str(repo))


def test_from_hub_missing_column_is_named(tmp_path):
    table = datasets.Dataset.from_dict({"image": [Image.open(io.BytesIO(jpeg(0)))], "label": [0]})
    (tmp_path / "copy" / "data").mkdir(parents=True)
    table.to_parquet(str(tmp_path / "copy" / "data" / "train.parquet"))
    with pytest.raises(
        UserError, match=r"split 'train' lacks column\(s\) domain \(has image, label\)"
    ):
        download_dataset(PACS, tmp_path / "data", from_hub=str(tmp_path / "copy"))


def test_from_hub_unloadable_repo_is_named(tmp_path):
    with pytest.raises(
        UserError, match=r"cannot load '.*no-such-folder' with datasets.load_dataset"
    ):
        download_dataset(PACS, tmp_path / "data", from_hub=str(tmp_path / "no-such-folder"))


def test_cli_prints_one_red_line_and_exits_2(tmp_path):
    env = os.environ | {"COLUMNS": "300", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "domainbed_reasoning",
            "download",
            "PACS",
            "--data-dir",
            str(tmp_path),
            "--from-archive",
            str(tmp_path / "missing.zip"),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --from-archive {tmp_path / 'missing.zip'}: no such file or folder"
    ]


def cct20_files(folder: Path, images: dict[str, bytes] | None = None) -> dict:
    """DomainBed's current TerraIncognita sources: LILA's CCT20 images and five annotation files."""
    categories = [{"id": 1, "name": "bird"}, {"id": 2, "name": "coyote"}, {"id": 3, "name": "deer"}]
    splits = {
        "train": [("a", "38", 1), ("b", "100", 2)],
        "cis_val": [("c", "7", 1)],
        "cis_test": [("d", "46", 3)],
        "trans_val": [("e", "43", 2), ("e", "43", 2)],  # annotated twice: still one file
        "trans_test": [("f", "100", 1)],
    }
    members = {}
    for split, rows in splits.items():
        coco = {
            "categories": categories,
            "images": [{"id": i, "file_name": f"{i}.jpg", "location": loc} for i, loc, _ in dict.fromkeys(rows)],
            "annotations": [{"image_id": i, "category_id": cat} for i, _, cat in rows],
        }
        members[f"eccv_18_annotation_files/{split}_annotations.json"] = json.dumps(coco).encode()
    (folder / TERRA_ANNOTATIONS).write_bytes(tar_gz_bytes(members))
    images = images or {f"eccv_18_all_images_sm/{name}.jpg": jpeg(i) for i, name in enumerate("abcdef")}
    (folder / TERRA_IMAGES).write_bytes(tar_gz_bytes(images))
    return members


def test_terra_incognita_follows_domainbeds_current_recipe(tmp_path, lila, capfd):
    cct20_files(lila)
    result = download_dataset(get_spec("TerraIncognita"), tmp_path / "data", from_archive=[lila])

    root = tmp_path / "data" / "terra_incognita"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg")) == [
        "location_100/bird/f.jpg",
        "location_100/coyote/b.jpg",
        "location_38/bird/a.jpg",
        "location_43/coyote/e.jpg",
    ], "the five files are merged; location 7 and the class deer are left out"
    assert result.files == 4
    warning = capfd.readouterr().err
    assert "TerraIncognita: 4 images prepared (location_100 2, location_38 1, location_43 1, location_46 0), " in warning
    assert "DomainBed reports 24,788" in warning and warning.count("\n") == 1


def test_terra_incognita_recipe_is_the_one_domainbed_uses_since_june_2024():
    images, annotations = get_recipe("TerraIncognita").files
    lila = "https://storage.googleapis.com/public-datasets-lila/caltechcameratraps"
    assert images.url == f"{lila}/eccv_18_all_images_sm.tar.gz"
    assert annotations.url == f"{lila}/eccv_18_annotations.tar.gz"
    assert annotations.also_accepted == ("caltech_camera_traps.json.zip",)
    duplicates = get_recipe("DomainNet").files[-1]
    assert duplicates.url == (
        f"https://raw.githubusercontent.com/facebookresearch/DomainBed/{DOMAINBED_COMMIT}"
        "/domainbed/misc/domain_net_duplicates.txt"
    )
    assert len(DOMAINBED_COMMIT) == 40, "a full commit id, not a branch that can move"


def test_terra_incognita_from_the_older_single_json(tmp_path, lila):
    terra_files(lila)
    (lila / TERRA_ANNOTATIONS).rename(lila / "caltech_camera_traps.json.zip")
    download_dataset(get_spec("TerraIncognita"), tmp_path / "data", from_archive=[lila])
    assert (tmp_path / "data" / "terra_incognita" / "location_38" / "bird" / "a.jpg").is_file()


def test_terra_incognita_incomplete_annotations_are_named(tmp_path, lila):
    members = cct20_files(lila)
    del members["eccv_18_annotation_files/cis_val_annotations.json"]
    (lila / TERRA_ANNOTATIONS).write_bytes(tar_gz_bytes(members))
    with pytest.raises(
        UserError, match=r"eccv_18_annotations.tar.gz: cis_val_annotations.json missing: the archive"
    ):
        download_dataset(get_spec("TerraIncognita"), tmp_path / "data", from_archive=[lila])


def test_a_duplicates_list_that_is_not_domainbeds_is_refused(tmp_path):
    spec = get_spec("DomainNet")
    sources = tmp_path / "visda"
    sources.mkdir()
    for domain in spec.domains:
        (sources / f"{domain}.zip").write_bytes(zip_bytes({f"{domain}/zigzag/{domain}_1.jpg": jpeg(1)}))
    (sources / "domain_net_duplicates.txt").write_text("<html><body>rate limited</body></html>\n")
    with pytest.raises(
        UserError, match=r"domain_net_duplicates.txt: entry '<html><body>rate limited</body></html>' is not "
        r"<domain>/<class>/<file> of DomainNet"
    ):
        download_dataset(spec, tmp_path / "data", from_archive=[sources])
    assert (tmp_path / "data" / STAGING / "domain_net" / "layout" / "clipart" / "zigzag").is_dir(), (
        "nothing was removed"
    )


def test_zip_bomb_is_one_line_and_writes_nothing(tmp_path):
    archive = tmp_path / "PACS.zip"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("kfold/photo/dog/huge.jpg", bytes(20 * 1024**2))
    archive.write_bytes(buffer.getvalue())
    target = tmp_path / "out"
    with pytest.raises(
        UserError, match=r"^PACS.zip: would expand [\d,]+x \(cap 200x\), like a zip bomb; nothing was extracted"
    ):
        extract(archive, target, Progress(disable=True))
    assert not target.exists() and not (tmp_path / "out.tmp").exists()


def test_total_size_cap_is_one_line(tmp_path):
    archive = tmp_path / "PACS.zip"
    archive.write_bytes(pacs_archive())
    with pytest.raises(UserError, match=r"^PACS.zip: unpacks to [\d,]+ bytes, over the 1,000-byte cap"):
        extract(archive, tmp_path / "out", Progress(disable=True), ArchiveLimits(max_total_bytes=1000))


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs), so a full disk is the kernel's ENOSPC, not a simulation."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_one_line_naming_the_folder(lila, small_disk):
    """The images fit once (extraction passes its check) but not twice (the copies into the layout)."""
    noise = {f"eccv_18_all_images_sm/{name}.jpg": os.urandom(120_000) for name in "abcdef"}
    cct20_files(lila, noise)
    with pytest.raises(UserError) as err:
        download_dataset(get_spec("TerraIncognita"), small_disk / "data", from_archive=[lila])
    message = str(err.value)
    assert message.startswith(f"no space left on the disk holding {small_disk / 'data' / STAGING / 'terra_incognita'}: ")
    assert "\n" not in message and "run the same command again" in message


def test_archive_larger_than_the_free_space_is_refused_before_writing(tmp_path, small_disk):
    archive = tmp_path / "PACS.zip"
    archive.write_bytes(zip_bytes({f"kfold/photo/dog/{i}.jpg": os.urandom(300_000) for i in range(4)}))
    with pytest.raises(UserError, match=r"^PACS.zip needs 1,200,000 bytes but the disk holding .* has [\d,]+ free"):
        extract(archive, small_disk / "out", Progress(disable=True))
    assert list(small_disk.iterdir()) == []
