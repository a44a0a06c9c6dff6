"""A process generating with the vLLM engine until it is killed: tests/test_engines.py SIGTERMs it
mid-generation and checks that its server went with it.

Writes `<out>/server.pid` (the server's process group) once the server answers, then
`<out>/generating` before each generate call.
"""

from __future__ import annotations

import sys
from pathlib import Path

from domainbed_reasoning.train.engines.base import GenRequest, SamplingSpec
from domainbed_reasoning.train.engines.vllm_engine import VLLMEngine


def main(model: Path, image: Path, vllm_python: Path, out: Path) -> None:
    requests = [GenRequest(f"image-{index}", image.read_bytes(), "Describe the image.") for index in range(4)]
    sampling = SamplingSpec(n=2, temperature=1.0, max_new_tokens=256)
    with VLLMEngine(str(model), vllm_python=vllm_python, log_path=out / "server.log") as engine:
        (out / "server.pid").write_text(str(engine.server.process.pid))
        while True:
            (out / "generating").touch()
            engine.generate(requests, sampling, progress=False)


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:]))
