"""Where each DomainBed dataset comes from: the files DomainBed's own download script fetches.

Kept as data (facebookresearch/DomainBed, `domainbed/scripts/download.py`) so a broken
link is a one-line fix and a test can point a dataset at a local server. A checksum is
recorded only where a public project verifies the same file with it; none is invented.

TerraIncognita follows DomainBed's recipe since its commit 3cf2e20 (June 2024, DomainBed
issue #136: the `lilablobssc` host stopped serving the old files): LILA's CCT20 benchmark
subset, the small images plus `eccv_18_annotations.tar.gz`, whose five COCO files are merged.
Files DomainBed ships itself (DomainNet's list of duplicates) are fetched at that pinned
commit, so their content cannot change under a user.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from domainbed_reasoning.errors import UserError


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch; `moves` maps an archive folder to its place under the dataset root."""

    url: str
    filename: str
    checksum: str | None = None
    size: int | None = None
    moves: dict[str, str] = field(default_factory=dict)
    also_accepted: tuple[str, ...] = ()  # older names of the same content, for --from-archive

    @property
    def names(self) -> tuple[str, ...]:
        return (self.filename, *self.also_accepted)

    @property
    def is_archive(self) -> bool:
        return self.filename.endswith((".zip", ".tar", ".tar.gz", ".tgz"))


@dataclass(frozen=True)
class DatasetRecipe:
    dataset: str
    files: tuple[RemoteFile, ...]
    homepage: str


def google_drive(file_id: str) -> str:
    return f"https://drive.google.com/uc?id={file_id}"


VISDA = "http://csr.bu.edu/ftp/visda/2019/multi-source"
LILA = "https://storage.googleapis.com/public-datasets-lila/caltechcameratraps"
DOMAINBED_COMMIT = "3cf2e20fb885f3ecf2e97b83268bb6c896568075"
DOMAINBED_RAW = f"https://raw.githubusercontent.com/facebookresearch/DomainBed/{DOMAINBED_COMMIT}"
DOMAINNET_DOMAINS = {
    "clipart": f"{VISDA}/groundtruth/clipart.zip",
    "infograph": f"{VISDA}/infograph.zip",
    "painting": f"{VISDA}/groundtruth/painting.zip",
    "quickdraw": f"{VISDA}/quickdraw.zip",
    "real": f"{VISDA}/real.zip",
    "sketch": f"{VISDA}/sketch.zip",
}
DOMAINNET_DUPLICATES = "domain_net_duplicates.txt"
TERRA_IMAGES = "eccv_18_all_images_sm.tar.gz"
TERRA_ANNOTATIONS = "eccv_18_annotations.tar.gz"
TERRA_LEGACY_ANNOTATIONS = "caltech_camera_traps.json.zip"  # DomainBed's recipe until June 2024

# The md5 sums are the ones torchvision-style loaders (e.g. LarsKue/context-aware-domain-generalization)
# check these very Google Drive files against.
RECIPES: dict[str, DatasetRecipe] = {
    source.dataset: source
    for source in (
        DatasetRecipe(
            dataset="PACS",
            files=(
                RemoteFile(
                    url=google_drive("1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd"),
                    filename="PACS.zip",
                    checksum="md5:fd5db817f7cdafeef3bfd525aaf9b42e",
                    moves={"kfold": "."},
                ),
            ),
            homepage="https://domaingeneralization.github.io/",
        ),
        DatasetRecipe(
            dataset="VLCS",
            files=(
                RemoteFile(
                    url=google_drive("1skwblH1_okBwxWxmRsp9_qi15hyPpxg8"),
                    filename="VLCS.tar.gz",
                    checksum="md5:8870171eba660927d9668f4e515928e4",
                    moves={"VLCS": "."},
                ),
            ),
            homepage="https://github.com/belaalb/G2DM#download-vlcs",
        ),
        DatasetRecipe(
            dataset="OfficeHome",
            files=(
                RemoteFile(
                    url=google_drive("1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC"),
                    filename="office_home.zip",
                    checksum="md5:b1c14819770c4448fd5b6d931031c91c",
                    moves={"OfficeHomeDataset_10072016": "."},
                ),
            ),
            homepage="https://www.hemanthdv.org/officeHomeDataset.html",
        ),
        DatasetRecipe(
            dataset="TerraIncognita",
            files=(
                RemoteFile(url=f"{LILA}/{TERRA_IMAGES}", filename=TERRA_IMAGES),
                RemoteFile(
                    url=f"{LILA}/{TERRA_ANNOTATIONS}",
                    filename=TERRA_ANNOTATIONS,
                    also_accepted=(TERRA_LEGACY_ANNOTATIONS,),
                ),
            ),
            homepage="https://lila.science/datasets/caltech-camera-traps",
        ),
        DatasetRecipe(
            dataset="DomainNet",
            files=tuple(
                RemoteFile(url=url, filename=f"{domain}.zip", moves={domain: domain})
                for domain, url in DOMAINNET_DOMAINS.items()
            )
            + (
                # Pinned to a commit, so its content is fixed; no checksum is published for it and
                # none could be computed here (the file could not be fetched), so prepare.py checks
                # every entry against the registry instead before removing anything.
                RemoteFile(
                    url=f"{DOMAINBED_RAW}/domainbed/misc/{DOMAINNET_DUPLICATES}",
                    filename=DOMAINNET_DUPLICATES,
                ),
            ),
            homepage="http://ai.bu.edu/M3SDA/",
        ),
    )
}


def get_recipe(dataset: str) -> DatasetRecipe:
    """The download recipe; datasets without one (SynthDG) say how they are made instead."""
    if dataset in RECIPES:
        return RECIPES[dataset]
    if dataset == "SynthDG":
        raise UserError("SynthDG is not downloaded: generate it with `dbr synth`")
    raise UserError(f"no download source for {dataset!r}: choose one of {', '.join(RECIPES)}")
