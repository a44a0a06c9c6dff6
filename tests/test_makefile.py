"""The Makefile's entry points as a user types them: settings checked before any install, the
teacher's model name asked of the server (and waited for while it starts), the GPUs counted from
CUDA_VISIBLE_DEVICES, and `make train` running every held-out domain.

Each `make` here is run with `-o .venv/.stamp` (the environment counts as up to date, so nothing
is installed), or with a VENV that does not exist and a PYTHON that fails, to prove that a check
ran before setup would have started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from domainbed_reasoning.data.registry import SPECS, get_spec
from domainbed_reasoning.offline.sim_teacher import SimTeacherConfig, run_sim_teacher
from domainbed_reasoning.offline.synth import generate

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make_env(env: dict[str, str] | None = None) -> dict[str, str]:
    environment = {
        key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS")
    }
    return environment | (env or {})


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=ROOT,
        check=False,
        env=make_env(env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def start_make(*args: str) -> subprocess.Popen:
    """A make in the background, stdout and stderr in one pipe (read it line by line)."""
    return subprocess.Popen(
        ["make", "--no-print-directory", *args],
        cwd=ROOT,
        env=make_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ngpu(env: dict[str, str]) -> str:
    return make("--eval", "print-ngpu: ; @echo $(NGPU)", "print-ngpu", env=env).stdout.strip()


def test_ngpu_honours_cuda_visible_devices() -> None:
    assert ngpu({"CUDA_VISIBLE_DEVICES": "0,1"}) == "2"
    assert ngpu({"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b,GPU-c"}) == "3"
    assert ngpu({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == "1", "CUDA stops at the first negative entry"
    assert ngpu({"CUDA_VISIBLE_DEVICES": ""}) == "0"


def train_launch(*settings: str) -> str:
    result = make("--eval", "print-launch: ; @echo $(TRAIN_LAUNCH)", "print-launch", *settings)
    return result.stdout.strip()


def test_train_launches_accelerate_for_several_gpus_or_another_config() -> None:
    accelerate = ".venv/bin/accelerate launch --config_file"
    assert train_launch("NGPU=1") == train_launch("NGPU=0") == ".venv/bin/dbr"
    assert train_launch("NGPU=4") == (
        f"{accelerate} train/accelerate/ddp.yaml --num_processes 4 -m domainbed_reasoning"
    )
    zero3 = "ACCELERATE_CONFIG=train/accelerate/zero3.yaml"
    assert train_launch("NGPU=1", zero3) == (
        f"{accelerate} train/accelerate/zero3.yaml --num_processes 1 -m domainbed_reasoning"
    ), "ZeRO on one GPU still goes through accelerate"
    assert train_launch("NGPU=2", zero3).endswith("--num_processes 2 -m domainbed_reasoning")


def test_train_checks_its_inputs_before_installing_anything(tmp_path: Path) -> None:
    never = tmp_path / "venv"
    result = make(
        "train", f"DATA={tmp_path / 'no-export'}", f"VENV={never}", "PYTHON=false"
    )

    assert result.returncode == 2
    assert "train: no export folder" in result.stdout and "make build-chains export" in result.stdout
    assert not never.exists(), "setup ran before the check"


def test_train_names_a_hub_model_missing_from_the_cache_when_offline(tmp_path: Path) -> None:
    (tmp_path / "export" / "PACS").mkdir(parents=True)
    result = make(
        "train", f"DATA={tmp_path / 'export'}", "MODEL=nobody/no-such-model",
        f"VENV={tmp_path / 'venv'}", "PYTHON=false",
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")},
    )  # fmt: skip

    assert result.returncode == 2
    assert "nobody/no-such-model is not in the Hugging Face cache and HF_HUB_OFFLINE is set" in (
        result.stdout
    )


class HubAnswers(BaseHTTPRequestHandler):
    """The Hub's HTTP endpoint, as `make train` meets it: a status per path (200 for the rest)."""

    statuses: ClassVar[dict[str, int]] = {}
    seen: ClassVar[list[tuple[str, str | None]]] = []

    def do_HEAD(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(self.statuses.get(self.path, 200))
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[str]:
    """A local stand-in for the Hub's HTTP endpoint (HF_ENDPOINT), on 127.0.0.1."""
    HubAnswers.statuses, HubAnswers.seen = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubAnswers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("path", "status", "line"),
    [
        ("/nobody/model/resolve/main/config.json", 404, "the model nobody/model is not on the Hub"),
        ("/nobody/model/resolve/main/config.json", 401, "the model nobody/model is gated or private"),
        ("/nobody/model/resolve/main/config.json", 403, "your Hugging Face token has no access to the model"),
        ("/api/datasets/you/domainbed-reasoning", 404, "the dataset you/domainbed-reasoning is not on the Hub"),
    ],
)
def test_train_asks_the_hub_for_the_model_and_the_data_before_installing_anything(
    hub: str, tmp_path: Path, path: str, status: int, line: str
) -> None:
    HubAnswers.statuses = {path: status}
    result = make(
        "train", "DATA=you/domainbed-reasoning", "MODEL=nobody/model", f"VENV={tmp_path / 'venv'}",
        env={"HF_ENDPOINT": hub, "HF_TOKEN": "hf_secret", "HF_HUB_OFFLINE": ""},
    )  # fmt: skip

    assert result.returncode == 2, result.stdout + result.stderr
    assert line in result.stdout and "hf_secret" not in result.stdout + result.stderr
    assert (path, "Bearer hf_secret") in HubAnswers.seen
    assert not (tmp_path / "venv").exists(), "setup ran before the check"


def test_train_runs_every_held_out_domain_when_no_target_is_given(hub: str, tmp_path: Path) -> None:
    (tmp_path / "export" / "OfficeHome").mkdir(parents=True)
    result = make(
        "-o", ".venv/.stamp", "train", "DATASET=OfficeHome", f"DATA={tmp_path / 'export'}",
        "NGPU=0", "TRAIN_LAUNCH=echo", env={"HF_ENDPOINT": hub, "HF_HUB_OFFLINE": ""},
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    launched = [line for line in result.stdout.splitlines() if line.startswith("train OfficeHome")]
    assert [line.split("--target ")[1].split(" --model")[0] for line in launched] == list(
        get_spec("OfficeHome").domains
    )
    assert all("--model OpenGVLab/InternVL3-8B-hf --method rd-mldg" in line for line in launched)
    assert all("--resume" in line.split() for line in launched), "a re-run skips finished domains"


def test_build_chains_checks_the_data_folder_before_installing_anything(tmp_path: Path) -> None:
    result = make(
        "build-chains", "DATASET=SynthDG", f"DATA_DIR={tmp_path}", "TEACHER_WAIT=0",
        f"VENV={tmp_path / 'venv'}", "PYTHON=false",
    )  # fmt: skip

    assert result.returncode == 2
    assert f"no SynthDG folder under {tmp_path}/: run 'make synth'" in result.stdout


def test_build_chains_asks_the_teacher_which_model_it_serves(tmp_path: Path) -> None:
    """`make sim-teacher` then `make build-chains DATASET=SynthDG`, with nothing else set."""
    generate(tmp_path / "data", images_per_class=1)
    with run_sim_teacher(SimTeacherConfig(), tmp_path / "data") as url:
        result = make(
            "-o", ".venv/.stamp", "build-chains", "DATASET=SynthDG",
            f"DATA_DIR={tmp_path / 'data'}", f"RUNS={tmp_path / 'runs'}", f"TEACHER_URL={url}",
            "BUILD_ARGS=--limit 4 --no-progress",
        )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert "--teacher-model sim-teacher" in result.stdout + result.stderr
    assert (tmp_path / "runs" / "chains" / "SynthDG" / "chains.parquet").is_file()


def test_build_chains_waits_for_a_teacher_that_is_still_starting(tmp_path: Path) -> None:
    """`make sim-teacher` and `make build-chains DATASET=SynthDG` typed at once: build-chains waits
    while the teacher draws SynthDG and starts listening."""
    port = free_port()
    build = start_make(
        "-o", ".venv/.stamp", "build-chains", "DATASET=SynthDG", f"PORT={port}",
        f"DATA_DIR={tmp_path / 'data'}", f"RUNS={tmp_path / 'runs'}",
        "BUILD_ARGS=--limit 4 --no-progress",
    )  # fmt: skip
    try:
        assert build.stdout is not None
        first = build.stdout.readline()
        assert f"waiting for the teacher at http://127.0.0.1:{port}/v1" in first, first
        assert not (tmp_path / "data").exists(), "SynthDG is drawn only after build-chains waits"
        generate(tmp_path / "data", images_per_class=1)
        with run_sim_teacher(SimTeacherConfig(), tmp_path / "data", port=port):
            output = first + build.stdout.read()
            assert build.wait(timeout=120) == 0, output
    finally:
        build.kill()
        build.wait()

    assert "--teacher-model sim-teacher" in output
    assert (tmp_path / "runs" / "chains" / "SynthDG" / "chains.parquet").is_file()


def test_build_chains_waits_as_long_as_the_make_starting_the_teacher_lives(tmp_path: Path) -> None:
    """TEACHER_WAIT=0 would give up at the first poll; the live `make sim-teacher` (its process id in
    runs/.teacher-make.pid) keeps build-chains waiting until that make ends."""
    generate(tmp_path / "data", images_per_class=1)
    teacher_make = subprocess.Popen(
        ["make", "--no-print-directory", "-f", "/dev/null", "--eval", "hold: ; @sleep 300", "hold"],
        start_new_session=True,
    )
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / ".teacher-make.pid").write_text(f"{teacher_make.pid}\n")
    build = start_make(
        "build-chains-inputs", "DATASET=SynthDG", f"PORT={free_port()}", "TEACHER_WAIT=0",
        f"DATA_DIR={tmp_path / 'data'}", f"RUNS={tmp_path / 'runs'}",
    )  # fmt: skip
    try:
        assert build.stdout is not None
        assert "waiting for the teacher" in build.stdout.readline()
        with pytest.raises(subprocess.TimeoutExpired):
            build.wait(timeout=3)
        os.killpg(teacher_make.pid, signal.SIGTERM)
        teacher_make.wait()
        output = build.stdout.read()
        assert build.wait(timeout=30) == 2, output
    finally:
        build.kill()
        build.wait()
        if teacher_make.poll() is None:
            os.killpg(teacher_make.pid, signal.SIGKILL)
            teacher_make.wait()

    assert "/v1/models does not answer" in output


def test_every_dataset_folder_reads_as_its_name() -> None:
    """build-chains-inputs finds a dataset's folder by its name, lower-cased, underscores dropped."""
    for spec in SPECS:
        assert spec.dirname.replace("_", "").lower() == spec.name.lower(), spec.name


def test_a_chromium_that_cannot_be_installed_does_not_stop_make_test(tmp_path: Path) -> None:
    """As root with no network, apt-get fails: one line says why, and the make goes on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in {
        "id": "echo 0",
        "apt-get": "echo 'W: Some index files failed to download'; "
        "echo 'E: Unable to locate package chromium' >&2; exit 100",
    }.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / name).chmod(0o755)
    missing = tmp_path / "chromium"
    result = make(
        "chromium", f"CHROMIUM={missing}", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == (
        "chromium: could not install it (E: Unable to locate package chromium); "
        f"tests/test_browse.py skips until {missing} exists\n"
    )


def test_make_test_builds_the_documentation_strictly() -> None:
    result = make("-n", "-o", ".venv/.stamp", "-o", ".venv-vllm/.stamp", "test")

    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    docs = next(i for i, line in enumerate(commands) if "mkdocs build --strict" in line)
    tests = next(i for i, line in enumerate(commands) if "pytest" in line)
    assert docs < tests
