"""The real vLLM OpenAI server (CPU build) with the tiny model, and every way starting it can fail."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from PIL import Image

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.serving.vllm_server import (
    Endpoint,
    ServerConfig,
    VLLMServer,
    command,
    free_port,
    is_cpu_build,
    parse_lora_modules,
    resolve_vllm_python,
)


def png_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_models_endpoint_lists_the_served_name(vllm_teacher: Endpoint) -> None:
    models = httpx.get(f"{vllm_teacher.base_url}/models").json()
    assert [m["id"] for m in models["data"]] == [vllm_teacher.model]


def test_chat_completion_with_an_image_returns_n_samples(vllm_teacher: Endpoint) -> None:
    client = OpenAI(base_url=vllm_teacher.base_url, api_key="unused")
    response = client.chat.completions.create(
        model=vllm_teacher.model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url()}},
                    {"type": "text", "text": "Which class is this? Answer in five stages."},
                ],
            }
        ],
        n=2,
        temperature=1.0,
        max_tokens=32,
    )
    assert len(response.choices) == 2
    assert all(c.finish_reason in {"stop", "length"} for c in response.choices)
    assert all(isinstance(c.message.content, str) for c in response.choices)
    # The prompt holds the chat template, the text and the image's 4 placeholder tokens.
    assert response.usage.prompt_tokens > 4
    assert 2 <= response.usage.completion_tokens <= 2 * 32


def test_bad_checkpoint_surfaces_vllms_own_error(vllm_python: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no_such_arch"}')
    config = ServerConfig(
        model=str(tmp_path), port=free_port(), vllm_python=vllm_python, log_path=tmp_path / "log"
    )
    with pytest.raises(UserError, match=r"exited with code 1: .*no_such_arch.*full log: "):
        VLLMServer(config).start()


def test_python_without_vllm_fails_with_the_log_tail(tmp_model: Path, tmp_path: Path) -> None:
    config = ServerConfig(
        model=str(tmp_model),
        port=free_port(),
        vllm_python=Path(sys.executable),
        log_path=tmp_path / "server.log",
    )
    with pytest.raises(UserError, match=r"exited with code 1: .*No module named .vllm"):
        VLLMServer(config).start()


def test_server_that_never_answers_times_out_and_its_process_group_is_killed(
    tmp_model: Path, tmp_path: Path
) -> None:
    # A stand-in interpreter that ignores its arguments and hangs, with a child of its own.
    hanging = tmp_path / "python"
    hanging.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pgid\nsleep 300 &\nsleep 300\n")
    hanging.chmod(0o755)
    config = ServerConfig(
        model=str(tmp_model),
        port=free_port(),
        vllm_python=hanging,
        log_path=tmp_path / "server.log",
        startup_timeout_s=2,
    )
    server = VLLMServer(config)
    with pytest.raises(UserError, match=r"was not ready after 2 s: see .*server.log"):
        server.start()
    assert server.process is None
    with pytest.raises(ProcessLookupError):
        os.killpg(int((tmp_path / "pgid").read_text()), 0)


STARTER = """
import sys
from pathlib import Path
from domainbed_reasoning.serving.vllm_server import ServerConfig, VLLMServer, free_port
model, log = sys.argv[1:]
VLLMServer(ServerConfig(model=model, port=free_port(), vllm_python=Path(sys.executable), log_path=Path(log))).start()
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for a parent (here, a container's init) to reap it."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_a_server_whose_starter_is_killed_outright_goes_with_it(
    tmp_model: Path, tmp_path: Path
) -> None:
    """SIGKILL leaves the starting process no chance to stop its server, which runs in a session
    of its own: the kernel must stop it. The server is a stand-in vLLM module that would sleep on."""
    pid_file = tmp_path / "server.pid"
    module = tmp_path / "fake" / "vllm" / "entrypoints" / "openai" / "api_server.py"
    module.parent.mkdir(parents=True)
    module.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)\n")
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_model), str(tmp_path / "log")],
        env=os.environ | {"PYTHONPATH": str(tmp_path / "fake")},
    )
    try:
        for _ in range(600):
            if pid_file.is_file() and pid_file.read_text():
                break
            time.sleep(0.1)
        server = int(pid_file.read_text())
        assert _running(server)
        starter.kill()
        starter.wait()
        for _ in range(300):
            if not _running(server):
                break
            time.sleep(0.1)
        assert not _running(server), "the server outlived the process that started it"
    finally:
        starter.kill()
        if pid_file.is_file() and _running(server := int(pid_file.read_text())):
            os.kill(server, signal.SIGKILL)


@pytest.fixture
def tmp_model(tmp_path: Path) -> Path:
    """A folder that passes the pre-flight check; these tests never get as far as loading it."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_missing_vllm_python_says_make_vllm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBR_VLLM_PYTHON", raising=False)
    with pytest.raises(
        UserError, match=r"vLLM python /no/python does not exist: run `make vllm-env`"
    ):
        resolve_vllm_python(Path("/no/python"))


def test_vllm_python_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DBR_VLLM_PYTHON", sys.executable)
    assert resolve_vllm_python(None) == Path(sys.executable)
    monkeypatch.setenv("DBR_VLLM_PYTHON", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="missing does not exist"):
        resolve_vllm_python(None)


def test_model_folder_without_config_is_refused_before_starting(tmp_path: Path) -> None:
    config = ServerConfig(model=str(tmp_path / "nope"), vllm_python=Path(sys.executable))
    with pytest.raises(
        UserError, match=r"model folder .*nope not found or has no config.json: pass a saved model"
    ):
        VLLMServer(config).start()



def test_busy_port_is_refused(tmp_model: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = ServerConfig(model=str(tmp_model), port=port, vllm_python=Path(sys.executable))
        with pytest.raises(UserError, match=rf"port {port} on 127.0.0.1 is already in use"):
            VLLMServer(config).start()


def test_lora_adapter_without_adapter_config_is_refused(tmp_model: Path, tmp_path: Path) -> None:
    config = ServerConfig(
        model=str(tmp_model),
        port=free_port(),
        lora_modules={"round1": tmp_path},
        vllm_python=Path(sys.executable),
    )
    with pytest.raises(UserError, match=r"LoRA adapter round1=.* has no adapter_config.json"):
        VLLMServer(config).start()


@pytest.mark.parametrize("spec", ["round1", "=path", "round1="])
def test_lora_spec_must_be_name_equals_path(spec: str) -> None:
    with pytest.raises(UserError, match=r"is not name=path: write e.g. --lora round1="):
        parse_lora_modules([spec])


def test_command_maps_every_option_to_vllms_flags() -> None:
    config = ServerConfig(
        model="org/model",
        served_model_name="t",
        port=9001,
        tensor_parallel_size=4,
        max_model_len=4096,
        dtype="bfloat16",
        limit_mm_per_prompt={"image": 2},
        lora_modules=parse_lora_modules(["r1=/a", "r2=/b"]),
        max_lora_rank=16,
        mm_processor_kwargs={"max_patches": 6},
        extra_args=("--gpu-memory-utilization", "0.8"),
    )
    argv = command(config, Path("/py"))
    assert argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    flags = " ".join(argv[3:])
    for expected in (
        "--model org/model",
        "--served-model-name t",
        "--host 127.0.0.1 --port 9001",
        "--tensor-parallel-size 4",
        "--max-model-len 4096",
        "--dtype bfloat16",
        '--limit-mm-per-prompt {"image": 2}',
        "--enable-lora --max-lora-rank 16 --lora-modules r1=/a r2=/b",
        '--mm-processor-kwargs {"max_patches": 6}',
    ):
        assert expected in flags
    assert argv[-2:] == ["--gpu-memory-utilization", "0.8"]
    plain = command(ServerConfig(model="m"), Path("/py"))
    assert "--enable-lora" not in plain and "--mm-processor-kwargs" not in plain


def test_the_cpu_build_prefills_whole_prompts_unless_told_otherwise(vllm_python: Path) -> None:
    """vLLM's CPU build dies on a seeded request prefilled in parts; the GPU build is left alone."""
    assert is_cpu_build(vllm_python)  # the suite's vLLM is the CPU build
    assert not is_cpu_build(Path(sys.executable)) and not is_cpu_build(Path("/no/python"))
    flags = ["--no-enable-chunked-prefill", "--no-enable-prefix-caching", "--enforce-eager"]
    cpu = command(ServerConfig(model="m"), Path("/py"), cpu_build=True)
    assert all(flag in cpu for flag in flags)
    assert not set(flags) & set(command(ServerConfig(model="m"), Path("/py")))
    told = ServerConfig(model="m", extra_args=("--enable-prefix-caching",))
    argv = command(told, Path("/py"), cpu_build=True)
    assert "--no-enable-prefix-caching" not in argv and "--no-enable-chunked-prefill" in argv


def test_cli_reports_a_missing_vllm_env_in_one_line(tmp_model: Path) -> None:
    argv = ["serve-teacher", "--model", str(tmp_model), "--vllm-python", "/no/python"]
    result = subprocess.run(
        [sys.executable, "-m", "domainbed_reasoning", *argv],
        check=False,
        capture_output=True,
        text=True,
        env=os.environ | {"COLUMNS": "300"},
    )
    expected = (
        "error: vLLM python /no/python does not exist: run `make vllm-env`, "
        "or point --vllm-python / DBR_VLLM_PYTHON at a python that has vllm installed"
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [expected]


@pytest.mark.timeout(60)
def test_cli_serves_until_sigterm_then_stops_the_server_group(
    tmp_model: Path, tmp_path: Path
) -> None:
    # A stand-in for vLLM that answers GET /v1/models, so this checks our process handling only.
    fake = tmp_path / "python"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import http.server, os, sys\n"
        f"open({str(tmp_path / 'pgid')!r}, 'w').write(str(os.getpgid(0)))\n"
        "class Models(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(b'{}')\n"
        "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
        "http.server.HTTPServer(('127.0.0.1', port), Models).serve_forever()\n"
    )
    fake.chmod(0o755)
    port = free_port()
    argv = [
        "serve-teacher",
        "--model",
        str(tmp_model),
        "--port",
        str(port),
        "--vllm-python",
        str(fake),
    ]
    argv += ["--log", str(tmp_path / "server.log")]
    cli = subprocess.Popen(
        [sys.executable, "-m", "domainbed_reasoning", *argv], stdout=subprocess.PIPE, text=True
    )
    assert cli.stdout is not None
    assert cli.stdout.readline().strip() == f"serving teacher at http://127.0.0.1:{port}/v1"
    cli.terminate()
    assert cli.wait(timeout=30) == 0
    assert "stopping vLLM" in cli.stdout.read()
    with pytest.raises(ProcessLookupError):
        os.killpg(int((tmp_path / "pgid").read_text()), 0)
