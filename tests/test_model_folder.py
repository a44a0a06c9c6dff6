"""A model name means the same to the server, the engines and the processor loader."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from domainbed_reasoning.train.engines.factory import open_engine
from domainbed_reasoning.train.engines.settings import EngineSettings
from domainbed_reasoning.train.model.processor import load_processor

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.model_folder import is_local_model
from domainbed_reasoning.serving.vllm_server import ServerConfig, VLLMServer


@pytest.mark.parametrize("name", ["checkpoint-typo", "runs/mtct/model/extra", "./org/name"])
def test_a_name_that_is_no_hub_id_is_read_as_a_folder_everywhere(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server and the training stages read a model name one way: only `org/name` is a Hub
    id, so a mistyped folder stops here rather than being asked of the Hub."""
    monkeypatch.chdir(tmp_path)
    expected = rf"^model folder {re.escape(name)} not found or has no config.json"
    with pytest.raises(UserError, match=expected):
        VLLMServer(ServerConfig(model=name, vllm_python=Path(sys.executable))).start()
    with pytest.raises(UserError, match=expected):
        load_processor(name)
    with pytest.raises(UserError, match=expected):
        open_engine(EngineSettings("transformers"), name)


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("OpenGVLab/InternVL3-2B-hf", True),
        ("Qwen/Qwen2-VL-2B-Instruct", False),
        ("./Qwen/x", True),
        ("~/m", True),
        ("/m", True),
        ("m", True),
    ],
)
def test_only_org_slash_name_that_is_no_folder_here_is_a_hub_id(
    name: str, local: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "OpenGVLab" / "InternVL3-2B-hf").mkdir(parents=True)
    assert is_local_model(name) is local
