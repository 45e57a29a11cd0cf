"""mkdocs hook: the benchmark and experiment reports join the site from where they live.

benchmarks/RESULTS.md and experiments/README.md (with their figures and per-experiment
summaries) are written next to the code that produces them; copying them into docs/ would
leave two versions to drift apart. This adds them to the site under the same paths, so a
guide links `../benchmarks/RESULTS.md` and the report's own relative links keep working.
Files of the repository that a report links to (a config, a script) come along as plain
files, so such a link does not break the strict build.
"""

from __future__ import annotations

import pathlib
import re

from mkdocs.structure.files import File, Files

ROOT = pathlib.Path(__file__).resolve().parent.parent
# (folder, patterns): what the reports consist of; anything else in those folders stays out.
REPORTS = {
    "benchmarks": [
        "RESULTS.md",
        "RESULTS-accelerators.md",
        "RESULTS-tpu-conv-fusion.md",
        "RESULTS-running-shift.md",
        "*.png",
    ],
    "experiments": ["README.md", "results/*/*.md", "results/*/*.png"],
}
LINK = re.compile(r"\]\(([^)#\s]+)")  # the target of a Markdown link or image, without its anchor


def add(files: Files, config, path: pathlib.Path) -> None:
    src_uri = path.relative_to(ROOT).as_posix()
    if files.get_file_from_path(src_uri) is None:
        files.append(File.generated(config, src_uri, abs_src_path=str(path)))


def linked_files(report: pathlib.Path) -> list[pathlib.Path]:
    """Repository files (not Markdown: pages must be reports) that `report` links to."""
    out = []
    for target in LINK.findall(report.read_text()):
        if "://" in target or target.startswith(("/", "mailto:")):
            continue
        path = (report.parent / target).resolve()
        if path.is_file() and path.is_relative_to(ROOT) and path.suffix != ".md":
            out.append(path)
    return out


def on_files(files: Files, config) -> Files:
    for folder, patterns in REPORTS.items():
        for pattern in patterns:
            for path in sorted((ROOT / folder).glob(pattern)):
                add(files, config, path)
                if path.suffix == ".md":
                    for linked in linked_files(path):
                        add(files, config, linked)
    return files
