"""vLLM's offline batch runner: its command and its refusals. It runs for real, through the
builder, in test_builder_batch.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.serving.vllm_batch import BATCH_MODULE, batch_command, run_batch
from domainbed_reasoning.serving.vllm_server import ServerConfig


def test_the_batch_command_carries_the_engine_flags() -> None:
    config = ServerConfig(model="org/model", served_model_name="t", tensor_parallel_size=2, extra_args=("--seed", "1"))
    argv = batch_command(config, Path("/py"), Path("in.jsonl"), Path("out.jsonl"))
    assert argv[:7] == ["/py", "-m", BATCH_MODULE, "-i", "in.jsonl", "-o", "out.jsonl"]
    flags = " ".join(argv)
    assert "--model org/model --served-model-name t --tensor-parallel-size 2" in flags
    assert "--host" not in flags and argv[-2:] == ["--seed", "1"]


def test_a_missing_model_folder_is_one_line(tmp_path: Path) -> None:
    config = ServerConfig(model=str(tmp_path / "nothing-here"), vllm_python=Path("/bin/true"))
    with pytest.raises(UserError, match="has no config.json"):
        run_batch(config, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
