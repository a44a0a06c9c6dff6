"""`dbr publish` against a local stand-in for the Hub's HTTP API (the only thing a test may replace).

The stand-in implements the endpoints huggingface_hub 2.x calls for `create_repo`,
`create_branch` and `upload_folder`: repo create, branch create, YAML validation of
the card, tree listing (for deletions), preupload (it answers "regular" for every
file, so content travels base64 in the NDJSON commit and no Xet storage is involved)
and commit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml
from typer.testing import CliRunner

from domainbed_reasoning.cli import app
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.hub.export import export
from domainbed_reasoning.hub.publish import plan_publish, publish

TOKEN = "hf_testtoken_5f3a9c1e7b2d4a6f8e0c"
REPO_API = re.compile(
    r"^/api/(?P<type>datasets|models|spaces)/(?P<repo>[^/]+/[^/]+)/(?P<verb>tree|preupload|commit|branch)/(?P<rev>[^/?]+)"
)


@dataclass
class Repo:
    repo_type: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(
        default_factory=lambda: {"main": {".gitattributes": b"*.parquet lfs\n"}}
    )


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    validated: list[tuple[str, dict]] = field(default_factory=list)
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

    def do_POST(self) -> None:
        if not self._authorised():
            return
        path = urlparse(self.path).path
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
            return self._reply(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files
                    ]
                },
            )
        if match["verb"] == "commit":
            return self._commit(match["repo"], repo, rev)
        self._reply(404, {"error": f"unknown endpoint {path}"})

    def do_GET(self) -> None:
        if not self._authorised():
            return
        match = REPO_API.match(urlparse(self.path).path)
        repo = self.server.state.repos.get(match["repo"]) if match else None
        if repo is None or match["verb"] != "tree":
            return self._reply(404, {"error": "Repository not found"})
        files = repo.branches[unquote(match["rev"])]
        self._reply(200, [
            {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for path, data in sorted(files.items())
        ])  # fmt: skip

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
    assert len(hub.state.commits) == 1, "one commit for the whole folder"
    commit = hub.state.commits[0]
    assert commit["summary"] == "Export DomainBed-Reasoning: OfficeHome, SynthDG"
    assert url.startswith(f"{hub.url}/datasets/alice/domainbed-reasoning/commit/")
    published = {
        path: data for path, data in repo.branches["main"].items() if path != ".gitattributes"
    }
    assert published == _local_files(folder)
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


def test_republish_replaces_stale_shards_of_published_datasets_only(
    hub: FakeHub, folder: Path, token: str, chain_runs: tuple[Path, Path]
) -> None:
    chains_root, data_dir = chain_runs
    publish(folder, "alice/domainbed-reasoning", endpoint=hub.url)
    files = hub.state.repos["alice/domainbed-reasoning"].branches["main"]
    files["VLCS/Caltech101-00000-of-00001.parquet"] = b"published earlier from another folder"

    export(chains_root, data_dir, folder, ["SynthDG"], max_shard_bytes=1)
    publish(folder, "alice/domainbed-reasoning", endpoint=hub.url)

    assert "SynthDG/photo-00000-of-00001.parquet" in hub.state.commits[1]["deleted"]
    assert (
        "SynthDG/photo-00000-of-00009.parquet" in files
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
