"""The RD-MLDG paper's published accuracies (arXiv 2602.23777), as data for the report.

Kept as data rather than prose so `dbr report` can put the paper's number beside
ours wherever the same dataset, method and backbone were run: a reproduction is
only convincing next to the number it reproduces. Accuracy in percent, averaged
over the held-out domains, leave-one-domain-out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperRow:
    """One published row; `method` uses our method names (`zeroshot` for a model used as is)."""

    label: str
    source: str
    method: str
    backbone: str
    accuracy: dict[str, float]
    average: float | None = None

    def matches(self, method: str, model: str) -> bool:
        """Same method, and our model id names the paper's backbone (e.g. `.../InternVL3-8B-hf`)."""
        return self.method == method and self.backbone.lower() in model.lower()


def _table1(label: str, method: str, backbone: str, values: tuple[float, ...]) -> PaperRow:
    pacs, vlcs, officehome, terra, average = values
    accuracy = {"PACS": pacs, "VLCS": vlcs, "OfficeHome": officehome, "TerraIncognita": terra}
    return PaperRow(label, "Table 1", method, backbone, accuracy, average)


def _ablation(label: str, method: str, officehome: float, terra: float) -> PaperRow:
    accuracy = {"OfficeHome": officehome, "TerraIncognita": terra}
    return PaperRow(label, "Ablation", method, "InternVL3-8B", accuracy)


# RD-MLDG in Table 1 is the InternVL3-8B model: its OfficeHome/TerraInc numbers are the
# ablation's MTCT+SARR row, so that row is not repeated below.
PAPER_ROWS: tuple[PaperRow, ...] = (
    _table1(
        "RD-MLDG (InternVL3-8B)", "rd-mldg", "InternVL3-8B", (98.13, 87.03, 91.73, 70.65, 86.89)
    ),
    _table1("GPT-4o zero-shot", "zeroshot", "gpt-4o", (97.83, 85.41, 90.12, 60.49, 83.46)),
    _table1(
        "InternVL3-8B zero-shot", "zeroshot", "InternVL3-8B", (96.26, 85.67, 85.10, 46.84, 78.47)
    ),
    _ablation("CLS only (InternVL3-8B)", "cls", 89.39, 66.69),
    _ablation("Reasoning only (InternVL3-8B)", "reasoning", 88.76, 64.56),
    _ablation("+MTCT (InternVL3-8B)", "mtct", 90.58, 67.19),
    _ablation("+SARR without MTCT (InternVL3-8B)", "sarr", 90.91, 65.29),
)


def paper_rows_for(method: str, model: str) -> list[PaperRow]:
    return [row for row in PAPER_ROWS if row.matches(method, model)]
