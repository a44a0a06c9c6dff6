"""Scan throughput on a PACS-shaped tree of N files, beside a bare os.walk + stat in the same run.

The bare walk is the floor (directory listing and stat only); the ratio shows what
probing every image's header and tail costs on top.

    .venv/bin/python bench/bench_scan.py [--files 60000]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image

from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.data.scan import scan_dataset
from domainbed_reasoning.offline.demo_clock import machine


def build_tree(root: Path, files: int) -> None:
    spec = get_spec("PACS")
    buffer = io.BytesIO()
    Image.effect_noise((96, 96), 60).convert("RGB").save(buffer, "JPEG", quality=85)
    payload = buffer.getvalue()
    folders = [root / spec.dirname / d / c for d in spec.domains for c in spec.classes]
    for folder in folders:
        folder.mkdir(parents=True)
    for index in range(files):
        (folders[index % len(folders)] / f"{index:06d}.jpg").write_bytes(payload)


def bare_walk(root: Path) -> int:
    count = 0
    for folder, _, names in os.walk(root):
        for name in names:
            os.stat(os.path.join(folder, name))
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=60_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tree(root, args.files)
        start = time.perf_counter()
        walked = bare_walk(root)
        walk_s = time.perf_counter() - start
        start = time.perf_counter()
        result = scan_dataset(get_spec("PACS"), root)
        scan_s = time.perf_counter() - start
    assert walked == result.frame.height == args.files
    print(f"machine: {machine()}, Python {platform.python_version()}")
    print(f"files: {args.files:,}")
    print(f"bare os.walk+stat: {walk_s:6.2f} s ({walked / walk_s:,.0f} files/s)")
    print(f"dbr scan         : {scan_s:6.2f} s ({args.files / scan_s:,.0f} files/s)")
    print(f"scan / bare walk time ratio: {scan_s / walk_s:.1f}x")


if __name__ == "__main__":
    main()
