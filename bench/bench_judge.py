"""Judging cost per candidate: this tree's judge beside a baseline git revision's, in one run.

The builder judges every candidate it receives (hundreds per second per client
process), so the judge must stay a small share of a request's CPU. Each side runs in
its own interpreter (the baseline from `git archive REV`), alternately, on the same
generated answers: five-stage chains of about 1,000 characters whose conclusions are
- bare: the class name alone, as the prompt asks (a teacher repeats these, so the
  matcher's memo answers most of them);
- sentence: "The image shows a <class> in <style>." (some hundreds of distinct texts);
- distinct: every conclusion different, the memo never helps (the worst case).
The figure is the best of the repeats, in microseconds of process CPU time per
candidate (CPU time, so other processes on a shared machine inflate it less than wall
time); a fresh matcher per repeat, as one build starts with one.

    .venv/bin/python bench/bench_judge.py [--baseline REV] [--dataset DomainNet] [--candidates 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JUDGE_BEFORE_ISSUE_18 = "f7b1d28"  # the last commit with the judge that read any class mention
STYLES = ("a sketch", "a painting", "clip art", "a photo", "an infographic", "a doodle")
FILLER = (
    "The object has a distinct outline, proportions and surface texture that survive the change"
    " of style; its parts are arranged the way the category's members usually are. "
)


def answers(
    classes: tuple[str, ...], kind: str, count: int, seed: int = 0
) -> list[tuple[str, str]]:
    """(answer, label) pairs; one in five concludes another class, as a teacher sometimes does."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        label = rng.choice(classes)
        named = label if rng.random() < 0.8 else rng.choice(classes)
        words = named.replace("_", " ")
        conclusion = {
            "bare": words,
            "sentence": f"The image shows a {words} in {rng.choice(STYLES)}.",
            "distinct": f"The image most likely shows a {words}, seen from the side (#{index}).",
        }[kind]
        stages = {
            "SUMMARY": "I will compare the object's shape and parts with each category.",
            "CAPTION": FILLER * 2,
            "REASONING": FILLER * 2,
            "REFLECTION": "Similar categories differ in their outline, so they are ruled out.",
            "CONCLUSION": conclusion,
        }
        out.append(("\n".join(f"<{k}>{v}</{k}>" for k, v in stages.items()), label))
    return out


def worker(dataset: str, count: int, repeats: int) -> None:
    """Runs inside the interpreter whose PYTHONPATH selects the judge; prints JSON timings."""
    from domainbed_reasoning.chains.matching import ClassMatcher
    from domainbed_reasoning.chains.verdict import judge
    from domainbed_reasoning.data.registry import get_spec

    classes = tuple(get_spec(dataset).classes)
    timings = {}
    for kind in ("bare", "sentence", "distinct"):
        batch = answers(classes, kind, count)
        best = float("inf")
        for _ in range(repeats):
            matcher = ClassMatcher(classes)
            start = time.process_time()
            for text, label in batch:
                judge(text, matcher, label, "stop")
            best = min(best, time.process_time() - start)
        timings[kind] = 1e6 * best / count
    print(json.dumps(timings))


def baseline_tree(revision: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "archive", revision, "domainbed_reasoning", "prompts"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_side(root: Path, args: argparse.Namespace) -> dict[str, float]:
    env = os.environ | {"PYTHONPATH": str(root)}
    command = [sys.executable, __file__, "--worker", "--dataset", args.dataset]
    command += ["--candidates", str(args.candidates), "--repeats", str(args.repeats)]
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--baseline",
        default=JUDGE_BEFORE_ISSUE_18,
        help="git revision whose judge to compare against",
    )
    parser.add_argument("--dataset", default="DomainNet")
    parser.add_argument("--candidates", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two sides")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.dataset, args.candidates, args.repeats)
        return
    with tempfile.TemporaryDirectory() as scratch:
        base = baseline_tree(args.baseline, Path(scratch))
        sides: dict[str, list[dict[str, float]]] = {"baseline": [], "this tree": []}
        for _ in range(args.rounds):
            sides["baseline"].append(run_side(base, args))
            sides["this tree"].append(run_side(REPO, args))
    best = {side: {k: min(r[k] for r in runs) for k in runs[0]} for side, runs in sides.items()}
    print(
        f"{args.dataset}, {args.candidates:,} candidates x {args.repeats} repeats x {args.rounds} rounds;"
        f" {platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'conclusions':<12}{'baseline us':>14}{'this tree us':>15}{'ratio':>8}")
    for kind in best["baseline"]:
        old, new = best["baseline"][kind], best["this tree"][kind]
        print(f"{kind:<12}{old:>14.1f}{new:>15.1f}{new / old:>8.2f}")


if __name__ == "__main__":
    main()
