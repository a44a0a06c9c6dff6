"""`dbr publish` against a local stand-in for the Hub's HTTP API (the only thing a test may replace).

The stand-in implements the endpoints huggingface_hub 2.x calls for `create_repo`,
`create_branch`, `list_repo_tree`, `hf_hub_download`, `upload_folder` and `upload_file`: repo
create, branch create, YAML validation of the card, tree listing, file resolve, preupload and
commit. Like the real Hub, preupload answers "lfs" for the paths the repo's `.gitattributes`
sends to LFS (`*.parquet`), so those files take the Xet path that huggingface_hub uses with
`hf_xet` installed: a write token naming the CAS server (this same stand-in), then xorbs and
shards posted to it, and an `lfsFile` pointer (sha256, size) in the commit. The CAS accepts the
xorbs without decoding them (Xet's chunk format is LZ4-compressed and would need a codec the
project does not otherwise use), so a test resolves a committed pointer to bytes by its sha256,
as the Hub's own storage does. Small files (the card, build.json) travel base64 in the commit.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import datasets
import pytest
import yaml
from typer.testing import CliRunner

from domainbed_reasoning.cli import app
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.hub.export import export
from domainbed_reasoning.hub.publish import plan_publish, publish

TOKEN = "hf_testtoken_5f3a9c1e7b2d4a6f8e0c"
XET_TOKEN = "xet_write_token_for_the_test_cas"
REPO_API = re.compile(
    r"^/api/(?P<type>datasets|models|spaces)/(?P<repo>[^/]+/[^/]+)/"
    r"(?P<verb>tree|preupload|commit|branch|xet-write-token)/(?P<rev>[^/?]+)"
)
RESOLVE = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"


@dataclass(frozen=True)
class LfsPointer:
    """What a repo holds for a file uploaded to Xet/LFS storage: its sha256 and size."""

    oid: str
    size: int


@dataclass
class Repo:
    repo_type: str
    private: bool
    branches: dict[str, dict[str, bytes | LfsPointer]] = field(
        default_factory=lambda: {"main": {".gitattributes": GITATTRIBUTES}}
    )

    def lfs_patterns(self, rev: str) -> list[str]:
        attributes = self.branches[rev].get(".gitattributes", b"")
        return [line.split()[0] for line in attributes.decode().splitlines() if "filter=lfs" in line]


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    validated: list[tuple[str, dict]] = field(default_factory=list)
    xorbs: int = 0  # Xet objects the CAS received
    shards: int = 0
    commit_status: int = 200  # a test sets an error status to see how publish reports it


class FakeHubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _reply(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        header = self.headers.get("Authorization", "")
        self.server.state.auth_headers.append(header)
        if header != f"Bearer {TOKEN}":
            self._reply(401, {"error": "Invalid credentials in Authorization header"})
            return False
        return True

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _cas(self, method: str, path: str) -> None:
        """The Xet CAS: a dedup query finds nothing, xorbs and shards are accepted."""
        if self.headers.get("Authorization") != f"Bearer {XET_TOKEN}":
            return self._reply(401, {"error": "invalid xet token"})
        body = self._body() if method == "POST" else b""
        if method == "POST" and path.startswith("/v1/xorbs/"):
            self.server.state.xorbs += bool(body)
            return self._reply(200, {"was_inserted": True})
        if method == "POST" and path == "/v1/shards":
            self.server.state.shards += 1
            return self._reply(200, {"result": 1})
        if method == "POST" and path == "/v1/telemetry":
            return self._reply(200, {})
        self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        path = urlparse(self.path).path
        if path.startswith(("/v1/", "/v2/")):
            return self._cas("POST", path)
        if not self._authorised():
            return
        if path == "/api/repos/create":
            return self._create_repo(json.loads(self._body()))
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(self._body()))
        match = REPO_API.match(path)
        repo = self.server.state.repos.get(match["repo"]) if match else None
        if repo is None:
            return self._reply(404, {"error": "Repository not found"})
        rev = unquote(match["rev"])
        if match["verb"] == "branch":
            repo.branches.setdefault(rev, dict(repo.branches["main"]))
            return self._reply(200, {})
        if match["verb"] == "preupload":
            files = json.loads(self._body())["files"]
            lfs = repo.lfs_patterns(rev)
            modes = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs"
                    if any(fnmatch.fnmatch(f["path"], pattern) for pattern in lfs)
                    else "regular",
                    "shouldIgnore": False,
                }
                for f in files
            ]
            return self._reply(200, {"files": modes})
        if match["verb"] == "commit":
            return self._commit(match["repo"], repo, rev)
        self._reply(404, {"error": f"unknown endpoint {path}"})

    def do_GET(self) -> None:
        path = urlparse(self.path).path
        if path.startswith(("/v1/", "/v2/")):
            return self._cas("GET", path)
        if not self._authorised():
            return
        if RESOLVE.match(path):
            return self._resolve(RESOLVE.match(path), head=False)
        match = REPO_API.match(path)
        repo = self.server.state.repos.get(match["repo"]) if match else None
        if repo is None or unquote(match["rev"]) not in repo.branches:
            return self._reply(404, {"error": "Repository not found"})
        if match["verb"] == "xet-write-token":
            return self._reply(
                200, {"accessToken": XET_TOKEN, "exp": int(time.time()) + 3600, "casUrl": self.server.url}
            )
        if match["verb"] != "tree":
            return self._reply(404, {"error": f"unknown endpoint {path}"})
        self._reply(200, [
            {"type": "file", "path": name, **_tree_fields(data)}
            for name, data in sorted(repo.branches[unquote(match["rev"])].items())
        ])  # fmt: skip

    def do_HEAD(self) -> None:
        match = RESOLVE.match(urlparse(self.path).path)
        if match is None or not self._authorised():
            self.send_response(404)
            self.end_headers()
            return
        self._resolve(match, head=True)

    def _resolve(self, match: re.Match, head: bool) -> None:
        """A small file's bytes, with the headers `hf_hub_download` checks (commit, etag, size)."""
        repo = self.server.state.repos.get(match["repo"])
        files = repo.branches.get(unquote(match["rev"]), {}) if repo else {}
        data = files.get(unquote(match["path"]))
        if not isinstance(data, bytes):
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", hashlib.sha1(repr(sorted(files)).encode()).hexdigest())
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _create_repo(self, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.server.url}/datasets/{repo_id}"
        if repo_id in self.server.state.repos:
            return self._reply(409, {"error": "You already created this dataset repo", "url": url})
        self.server.state.repos[repo_id] = Repo(
            payload["type"], payload.get("visibility") == "private"
        )
        self._reply(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        """The Hub parses the card's front matter before an upload; a broken one is a 400."""
        try:
            meta = yaml.safe_load(payload["content"].split("---\n", 2)[1])
        except (IndexError, yaml.YAMLError) as err:
            return self._reply(400, {"errors": [{"message": str(err)}]})
        self.server.state.validated.append((payload["repoType"], meta))
        self._reply(200, {"errors": [], "warnings": []})

    def _commit(self, repo_id: str, repo: Repo, rev: str) -> None:
        if self.server.state.commit_status != 200:
            return self._reply(
                self.server.state.commit_status, {"error": "Files too large for this repo"}
            )
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        files = repo.branches[rev]
        added, deleted = [], []
        for line in lines[1:]:
            if line["key"] == "file":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                added.append(line["value"]["path"])
            elif line["key"] == "lfsFile":
                files[line["value"]["path"]] = LfsPointer(line["value"]["oid"], line["value"]["size"])
                added.append(line["value"]["path"])
            elif line["key"] == "deletedFile":
                files.pop(line["value"]["path"], None)
                deleted.append(line["value"]["path"])
            else:
                return self._reply(400, {"error": f"unsupported commit operation {line['key']}"})
        oid = hashlib.sha1(json.dumps(lines).encode()).hexdigest()
        self.server.state.commits.append(
            {
                "repo": repo_id,
                "revision": rev,
                "summary": lines[0]["value"]["summary"],
                "added": added,
                "deleted": deleted,
            }
        )
        self._reply(
            200,
            {"commitUrl": f"{self.server.url}/datasets/{repo_id}/commit/{oid}", "commitOid": oid},
        )


def _tree_fields(data: bytes | LfsPointer) -> dict:
    if isinstance(data, LfsPointer):
        lfs = {"oid": data.oid, "size": data.size, "pointerSize": 134}
        return {"size": data.size, "oid": hashlib.sha1(data.oid.encode()).hexdigest(), "lfs": lfs}
    return {"size": len(data), "oid": hashlib.sha1(data).hexdigest()}


class FakeHub(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.state = HubState()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def folder(chain_runs: tuple[Path, Path], tmp_path: Path) -> Path:
    chains_root, data_dir = chain_runs
    export(chains_root, data_dir, tmp_path / "domainbed-reasoning", ["SynthDG", "OfficeHome"])
    return tmp_path / "domainbed-reasoning"


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return TOKEN


def _local_files(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file()
    }


def _materialise(repo: Repo, into: Path, *sources: Path, rev: str = "main") -> Path:
    """The repo as `snapshot_download` would lay it out; an LFS pointer is resolved by its sha256
    among the files that were published (content-addressed, as the Hub's storage is)."""
    pool = {
        hashlib.sha256(data).hexdigest(): data
        for source in sources
        for data in _local_files(source).values()
    }
    for name, data in repo.branches[rev].items():
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        content = pool[data.oid] if isinstance(data, LfsPointer) else data
        assert not isinstance(data, LfsPointer) or len(content) == data.size
        target.write_bytes(content)
    return into


def test_publish_creates_the_dataset_repo_and_commits_every_file(
    hub: FakeHub,
    folder: Path,
    token: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    url = publish(folder, "alice/domainbed-reasoning", private=True, endpoint=hub.url)

    repo = hub.state.repos["alice/domainbed-reasoning"]
    assert repo.repo_type == "dataset" and repo.private
    data, card = hub.state.commits
    assert data["summary"] == "Export DomainBed-Reasoning: OfficeHome, SynthDG"
    assert card["summary"] == "Dataset card: OfficeHome, SynthDG" and card["added"] == ["README.md"]
    assert url.startswith(f"{hub.url}/datasets/alice/domainbed-reasoning/commit/")
    published = {path: blob for path, blob in repo.branches["main"].items() if path != ".gitattributes"}
    local = _local_files(folder)
    assert set(published) == set(local)
    for path, blob in published.items():
        if path.endswith(".parquet"):  # through Xet storage: the commit holds a pointer
            assert blob == LfsPointer(hashlib.sha256(local[path]).hexdigest(), len(local[path]))
        else:
            assert blob == local[path], path
    assert hub.state.xorbs >= 1 and hub.state.shards >= 1, "the Parquet bytes went to the CAS"
    assert {
        "README.md",
        "SynthDG/photo-00000-of-00001.parquet",
        "OfficeHome/Real_World-00000-of-00001.parquet",
    } <= set(published)
    assert set(hub.state.auth_headers) == {f"Bearer {token}"}, (
        "every request carried the resolved token"
    )
    assert [
        (kind, [c["config_name"] for c in meta["configs"]]) for kind, meta in hub.state.validated
    ] == [("dataset", ["OfficeHome", "SynthDG"])]
    out, err = capfd.readouterr()
    assert token not in caplog.text + out + err
    assert all(token.encode() not in data for data in _local_files(folder).values())


def test_publishing_another_folder_keeps_the_datasets_already_on_the_hub(
    hub: FakeHub, token: str, tmp_path: Path, make_chain_run
) -> None:
    """VLCS from one folder, then PACS from another: the card lists both and both load by name."""
    chains_root, data_dir = tmp_path / "chains", tmp_path / "data"
    make_chain_run(chains_root, data_dir, "VLCS", images_per_class=2, classes=2)
    make_chain_run(chains_root, data_dir, "PACS", images_per_class=2, classes=2)
    vlcs, pacs = tmp_path / "vlcs-export", tmp_path / "pacs-export"
    export(chains_root, data_dir, vlcs, ["VLCS"])
    export(chains_root, data_dir, pacs, ["PACS"])

    publish(vlcs, "alice/domainbed-reasoning", endpoint=hub.url)
    publish(pacs, "alice/domainbed-reasoning", endpoint=hub.url)

    repo = hub.state.repos["alice/domainbed-reasoning"]
    snapshot = _materialise(repo, tmp_path / "snapshot" / "domainbed-reasoning", vlcs, pacs)
    meta = yaml.safe_load((snapshot / "README.md").read_text().split("---\n", 2)[1])
    assert [config["config_name"] for config in meta["configs"]] == ["PACS", "VLCS"]
    assert [c["config_name"] for c in meta["configs"] if c.get("default")] == ["VLCS"], (
        "the Hub's default stays the dataset published first, whatever is published beside it"
    )
    assert [info["config_name"] for info in meta["dataset_info"]] == ["PACS", "VLCS"]
    body = (snapshot / "README.md").read_text()
    assert "| **VLCS** | all | 16 |" in body and "| **PACS** | all | 16 |" in body
    for name, first in (("VLCS", "Caltech101"), ("PACS", "art_painting")):
        ds = datasets.load_dataset(str(snapshot), name, cache_dir=str(tmp_path / "cache" / name))
        assert ds[first].num_rows == 4 and set(ds[first]["dataset"]) == {name}
    local_card = (pacs / "README.md").read_text()
    assert "config_name: VLCS" not in local_card, "the local folder's card still describes it alone"


def test_a_config_the_toolkit_did_not_write_stops_the_upload(
    hub: FakeHub, folder: Path, token: str
) -> None:
    publish(folder, "alice/domainbed-reasoning", endpoint=hub.url)
    files = hub.state.repos["alice/domainbed-reasoning"].branches["main"]
    card = files["README.md"].decode().replace("config_name: OfficeHome", "config_name: Mine", 1)
    files["README.md"] = card.encode()
    files["Mine/train-00000-of-00001.parquet"] = b"someone else's data"
    (folder / "OfficeHome").rename(folder / ".OfficeHome.moved")

    with pytest.raises(
        UserError,
        match=r"^dataset alice/domainbed-reasoning has a config 'Mine' that `dbr publish` did not "
        r"write \(no Mine/build\.json or card entry\): publish to another repo",
    ):
        publish(folder, "alice/domainbed-reasoning", endpoint=hub.url)
    assert len(hub.state.commits) == 2, "nothing was committed"


def test_republish_replaces_stale_shards_of_published_datasets_only(
    hub: FakeHub, folder: Path, token: str, chain_runs: tuple[Path, Path]
) -> None:
    chains_root, data_dir = chain_runs
    publish(folder, "alice/domainbed-reasoning", endpoint=hub.url)
    files = hub.state.repos["alice/domainbed-reasoning"].branches["main"]
    files["VLCS/Caltech101-00000-of-00001.parquet"] = b"published earlier from another folder"

    export(chains_root, data_dir, folder, ["SynthDG"], max_shard_bytes=1)
    publish(folder, "alice/domainbed-reasoning", endpoint=hub.url)

    assert "SynthDG/photo-00000-of-00001.parquet" in hub.state.commits[2]["deleted"]
    assert (
        "SynthDG/photo-00000-of-00010.parquet" in files
        and "SynthDG/photo-00000-of-00001.parquet" not in files
    )
    assert "VLCS/Caltech101-00000-of-00001.parquet" in files, (
        "datasets not in the folder are left alone"
    )
    assert "OfficeHome/Art-00000-of-00001.parquet" in files


def test_publish_to_a_revision_creates_the_branch(hub: FakeHub, folder: Path, token: str) -> None:
    publish(folder, "alice/domainbed-reasoning", revision="v1", endpoint=hub.url)

    repo = hub.state.repos["alice/domainbed-reasoning"]
    assert hub.state.commits[0]["revision"] == "v1"
    assert "README.md" in repo.branches["v1"] and "README.md" not in repo.branches["main"]


def test_hidden_staging_leftovers_are_not_published(hub: FakeHub, folder: Path, token: str) -> None:
    leftover = folder / ".SynthDG.abc123.tmp" / "photo-00000-of-00001.parquet"
    leftover.parent.mkdir()
    leftover.write_bytes(b"half-written")

    publish(folder, "alice/domainbed-reasoning", endpoint=hub.url)

    assert not any(path.startswith(".SynthDG") for path in hub.state.commits[0]["added"])
    assert all(not path.startswith(".") for path, _ in plan_publish(folder).files)


def test_rejected_token_is_a_one_line_error(
    hub: FakeHub, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(
        UserError,
        match=r"^the Hub refused access to dataset alice/domainbed-reasoning \(HTTP 401\): "
        r"use a token with write access \(`hf auth login` or HF_TOKEN\)$",
    ):
        publish(folder, "alice/domainbed-reasoning", endpoint=hub.url)
    assert hub.state.repos == {}


def test_refused_commit_is_a_one_line_error(hub: FakeHub, folder: Path, token: str) -> None:
    hub.state.commit_status = 422
    with pytest.raises(UserError) as err:
        publish(folder, "alice/domainbed-reasoning", endpoint=hub.url)
    assert str(err.value).startswith(
        "publishing dataset alice/domainbed-reasoning failed (HTTP 422): "
    )
    assert "\n" not in str(err.value) and "Files too large for this repo" in str(err.value)


def test_unreachable_hub_is_a_one_line_error(folder: Path, token: str) -> None:
    closed = FakeHub()  # bound, then closed: nothing listens on its port any more
    closed.server_close()
    with pytest.raises(
        UserError, match=rf"^cannot reach the Hub at {closed.url} \(.*\): check the network"
    ):
        publish(folder, "alice/domainbed-reasoning", endpoint=closed.url)


def test_missing_token_is_a_one_line_error(
    hub: FakeHub, folder: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(
        UserError,
        match=r"^no Hugging Face token: run `hf auth login` or set HF_TOKEN, then publish again$",
    ):
        publish(folder, "alice/domainbed-reasoning", endpoint=hub.url)
    assert hub.state.auth_headers == [], "nothing was sent"


@pytest.mark.parametrize(
    ("repo_id", "message"),
    [
        (
            "domainbed-reasoning",
            r"--repo-id 'domainbed-reasoning' needs an owner: use USER/domainbed-reasoning",
        ),
        (
            "alice/bad name!",
            r"--repo-id 'alice/bad name!' is not a Hub repo id: use USER/domainbed-reasoning",
        ),
    ],
)
def test_bad_repo_id_is_a_one_line_error(
    folder: Path, token: str, repo_id: str, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        publish(folder, repo_id)


def test_folder_that_is_not_an_export_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=r"is not an export folder \(no README\.md\): run `dbr export DATASET --out"
    ):
        plan_publish(tmp_path)
    (tmp_path / "README.md").write_text("hand-written\n")
    with pytest.raises(
        UserError, match=r"holds no exported dataset: run `dbr export DATASET --out"
    ):
        plan_publish(tmp_path)


def test_cli_dry_run_lists_files_and_total_size_and_uploads_nothing(
    hub: FakeHub, folder: Path
) -> None:
    result = CliRunner().invoke(
        app,
        ["publish", "--folder", str(folder), "--repo-id", "alice/x", "--dry-run"],
        env={"COLUMNS": "200"},
    )

    assert result.exit_code == 0, result.output
    plan = plan_publish(folder)
    assert len(plan.files) == 11  # README + 2 datasets x (4 shards + build.json)
    for path, _ in plan.files:
        assert path in result.output
    assert (
        f"{len(plan.files)} files, {plan.total_bytes:,} bytes in total; nothing uploaded"
        in result.output
    )
    assert plan.total_bytes == sum(len(data) for data in _local_files(folder).values())
    assert hub.state.auth_headers == []


def test_cli_publish_uses_hf_endpoint_and_hf_token_from_the_environment(
    hub: FakeHub, folder: Path, tmp_path: Path
) -> None:
    dbr = Path(sys.executable).with_name("dbr")
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    result = subprocess.run(
        [str(dbr), "publish", "--folder", str(folder), "--repo-id", "alice/domainbed-reasoning"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert (
        "published" in result.stdout
        and hub.state.repos["alice/domainbed-reasoning"].repo_type == "dataset"
    )
    assert TOKEN not in result.stdout + result.stderr
    assert not list((tmp_path / "hf-home").rglob("token")), "the token is never written to disk"
