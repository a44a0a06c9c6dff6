"""A PACS-shaped folder of blank 227x227 JPEGs: DomainBed's layout, image counts and image size.

The dry run needs only each image's size and the images' count, and every PACS image is
227x227, so `dbr build-chains PACS --dry-run` on this folder prints what it would on the
real one (the README's "Building with GPT-4o" figures come from it). The per-domain counts
are DomainBed's (photo 1,670, art_painting 2,048, cartoon 2,344, sketch 3,929); each
domain's images are dealt evenly over the seven classes, which the estimate does not see.

    .venv/bin/python bench/placeholder_pacs.py --data-dir /tmp/pacs-shaped
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image

from domainbed_reasoning.data.registry import get_spec

SIDE = 227
PER_DOMAIN = {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}


def build(data_dir: Path) -> int:
    spec = get_spec("PACS")
    buffer = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), "white").save(buffer, "JPEG", quality=90)
    payload = buffer.getvalue()
    for domain, count in PER_DOMAIN.items():
        for index in range(count):
            class_name = spec.classes[index % len(spec.classes)]
            folder = data_dir / spec.dirname / domain / class_name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{index:05d}.jpg").write_bytes(payload)
    return sum(PER_DOMAIN.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args()
    print(f"{build(args.data_dir):,} images of {SIDE}x{SIDE} under {args.data_dir / 'PACS'}")


if __name__ == "__main__":
    main()
