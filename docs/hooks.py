"""mkdocs hook: the benchmark and experiment reports join the site from where they live.

benchmarks/RESULTS.md and experiments/README.md (with their figures and per-experiment
summaries) are written next to the code that produces them; copying them into docs/ would
leave two versions to drift apart. This adds them to the site under the same paths, so a
guide links `../benchmarks/RESULTS.md` and the report's own relative links keep working.
"""

from __future__ import annotations

import pathlib

from mkdocs.structure.files import File, Files

ROOT = pathlib.Path(__file__).resolve().parent.parent
# (folder, patterns): what the reports consist of; anything else in those folders stays out.
REPORTS = {
    "benchmarks": ["RESULTS.md", "*.png"],
    "experiments": ["README.md", "results/*/*.md", "results/*/*.png"],
}


def on_files(files: Files, config) -> Files:
    for folder, patterns in REPORTS.items():
        for pattern in patterns:
            for path in sorted((ROOT / folder).glob(pattern)):
                src_uri = path.relative_to(ROOT).as_posix()
                if files.get_file_from_path(src_uri) is None:
                    files.append(File.generated(config, src_uri, abs_src_path=str(path)))
    return files
