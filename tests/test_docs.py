"""The documentation cannot rot: every ```python block of README.md and docs/**/*.md runs as
written, each in a fresh namespace (with the 8 CPU devices of conftest.py), and a `print(...)`
whose line ends in a comment must print what the comment says (`# True`, `# [1 1 1 1]`, or the
value followed by `:` and an explanation). The two-process snippet of the sync guide runs as two
processes, as its guide says. The API reference (docs/api/*.md) covers every public name, each
with a docstring, read statically by griffe as the site build reads it.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import io
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
import tokenize

import numpy as np
import pytest

pytestmark = pytest.mark.script_not_strict(
    "users' programs: keras's Dense (guides/keras.md) and optax.MultiSteps (guides/transforms.md) promote "
    "implicitly, and the equinox guide divides a loss by an int32 count"
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```[ \t]*$", flags=re.S | re.M)
SCRIPT_NAME = re.compile(r"# ([\w-]+\.py)\n")  # a block that starts with "# name.py" is a script


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line of the opening fence, code) of each ```python block of a Markdown file."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


BLOCKS = [(path, line, code) for path in DOC_FILES for line, code in python_blocks(path)]
IDS = [f"{path.relative_to(ROOT)}:{line}" for path, line, _ in BLOCKS]


def test_docs_have_snippets():
    counts = {path.relative_to(ROOT).as_posix(): len(python_blocks(path)) for path in DOC_FILES}
    assert counts["README.md"] >= 1, "the README's swap-in example is a ```python block"
    assert sum(counts.values()) >= 20, counts  # the guides carry the README's former snippets


def expected_prints(code: str) -> dict[tuple[int, int], str]:
    """{(first line, last line) of a print(...) statement: the comment on its last line}."""
    comments = {
        tok.start[0]: tok.string[1:].strip()
        for tok in tokenize.generate_tokens(io.StringIO(code).readline)
        if tok.type == tokenize.COMMENT
    }
    expected = {}
    for node in ast.walk(ast.parse(code)):
        call = node.value if isinstance(node, ast.Expr) else None
        is_print = isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print"
        if is_print and node.end_lineno in comments:
            expected[(node.lineno, node.end_lineno)] = comments[node.end_lineno]
    return expected


def run_block(code: str, name: str) -> list[tuple[int, str]]:
    """Execute `code` in a fresh namespace; return (line, text) of each print it made."""
    printed = []

    def recording_print(*args, sep=" ", end="\n", file=None, flush=False):
        frame = sys._getframe(1)
        if frame.f_code.co_filename == name:
            printed.append((frame.f_lineno, (" " if sep is None else sep).join(map(str, args))))
        builtins.print(*args, sep=sep, end=end, file=file, flush=flush)

    # dont_inherit: this file's `from __future__ import annotations` must not reach the snippet (it would
    # turn a flax dataclass's annotations into strings that dataclasses resolves through sys.modules).
    code_object = compile(code, name, "exec", dont_inherit=True)
    exec(code_object, {"__name__": "__docs__", "print": recording_print})
    return printed


def matches(text: str, comment: str) -> bool:
    return comment == text or comment.startswith((text + ":", text + " "))


@pytest.mark.parametrize(("path", "line", "code"), BLOCKS, ids=IDS)
def test_snippet_runs_and_prints_what_it_says(path, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    name = f"{path.relative_to(ROOT)}[python block at line {line}]"
    printed = run_block(code, name)
    for (first, last), comment in expected_prints(code).items():
        outputs = [text for lineno, text in printed if first <= lineno <= last]
        top_level = not code.splitlines()[first - 1].startswith((" ", "\t"))
        if top_level:
            assert outputs, f"{name}, block line {first}: the print(...) commented '# {comment}' never ran"
        for text in outputs:
            assert matches(text, comment), (
                f"{name}, block line {first}: printed {text!r}, the comment says '# {comment}'"
            )


def test_print_comment_matching():
    # The rule the snippets are held to: the printed text is the comment, or its first words.
    assert matches("True", "True") and matches("True", "True: the first sub-batch is normalized on its own")
    assert matches("1", "1: counted on both sides") and matches("[1 1 1 1]", "[1 1 1 1]")
    assert not matches("False", "True") and not matches("1", "10") and not matches("True", "Truex")


# ------------------------------------------------------------------- the two-process snippet


def script_and_command(path: pathlib.Path) -> tuple[str, str, list[list[str]]]:
    """The sync guide's script block (its first line names the file) and the processes the
    ```bash block right after it starts (`python NAME.py ARGS & ...`)."""
    text = path.read_text()
    match = re.search(r"^```python\n(# ([\w-]+\.py)\n.*?)^```\s*\n+```bash\n(.*?)^```", text, flags=re.S | re.M)
    assert match, f"{path}: no ```python block starting with '# NAME.py' followed by the ```bash block that runs it"
    code, script, command = match.groups()
    processes = [part.split()[1:] for part in re.split(r"[&;]", command.replace("wait", "")) if part.strip()]
    assert processes and all(p[0] == script for p in processes), command
    return script, code, processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_snippet_gives_the_global_statistics(tmp_path):
    script, code, processes = script_and_command(ROOT / "docs" / "guides" / "sync.md")
    assert len(processes) == 2
    code = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{free_port()}", code)  # a port nobody else holds
    (tmp_path / script).write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the script sets its own device count
    logs = [tmp_path / f"process_{i}.log" for i in range(len(processes))]
    procs = []
    deadline = time.monotonic() + 240
    try:
        for args, log in zip(processes, logs):
            with open(log, "w") as f:
                procs.append(
                    subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
                )
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it until the deadline
            time.sleep(0.2)
    finally:
        for p in procs:  # only the processes started here, by their handles
            if p.poll() is None:
                p.kill()
                p.wait()
    output = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(output)
    # Each process prints its id, the first 3 global means and the global count: those of the
    # 12 rows of both processes (RandomState(process id) rows, as the script makes them).
    rows = np.concatenate([np.random.RandomState(i).randn(6, 16).astype(np.float32) for i in range(2)])
    global_mean = rows.astype(np.float64).mean(0)
    for i, out in enumerate(output):
        line = next(text for text in out.splitlines() if text.startswith(f"{i} ["))
        numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d*)?(?:e[-+]?\d+)?", line)]
        assert numbers[0] == i and numbers[-1] == 12, line
        np.testing.assert_allclose(numbers[1:4], global_mean[:3], atol=1e-6, err_msg=line)


# ---------------------------------------------------------------------------- API reference

API_PAGES = sorted((ROOT / "docs" / "api").glob("*.md"))
DIRECTIVE = re.compile(r"^::: ([\w.]+)\n((?:[ \t]+.*\n)*)", flags=re.M)


def documented() -> dict[str, list[str]]:
    """{module: the members its `:::` directives list} over the API pages."""
    out: dict[str, list[str]] = {}
    for page in API_PAGES:
        for module, options in DIRECTIVE.findall(page.read_text()):
            members = re.search(r"members:\n((?:[ \t]+- \w+\n)+)", options)
            assert members, (
                f"{page.name}: `::: {module}` lists no members (list them: a module without __all__ would show its helpers)"
            )
            out.setdefault(module, []).extend(re.findall(r"- (\w+)", members.group(1)))
    return out


def test_every_public_module_has_a_reference_page():
    public = {f"jbn.{p.stem}" for p in (ROOT / "jbn").glob("*.py") if not p.stem.startswith("_")}
    public |= {
        f"jbn.{p.parent.name}" for p in (ROOT / "jbn").glob("*/__init__.py") if not p.parent.name.startswith("_")
    }
    missing = sorted(public - set(documented()))
    assert not missing, f"public modules without a `::: module` directive in docs/api/*.md: {missing}"


def test_every_public_name_is_documented_where_it_is_exported():
    import jbn

    pages = documented()
    for module_name, members in pages.items():
        module = importlib.import_module(module_name)
        exported = getattr(module, "__all__", None)
        if exported is not None:
            missing = sorted(set(exported) - set(members))
            assert not missing, f"{module_name}.__all__ names missing from its API page: {missing}"
        for member in members:
            assert hasattr(module, member), f"docs/api lists {module_name}.{member}, which does not exist"
    # Each name `import jbn` offers is on a page, as the very object jbn exports.
    for name in (n for n in jbn.__all__ if not n.startswith("__")):  # __version__ is no API page's
        value = getattr(jbn, name)
        if f"jbn.{name}" in pages:  # a submodule with its own page (jbn.nnx, jbn.interop)
            continue
        homes = [
            m for m, members in pages.items() if name in members and getattr(importlib.import_module(m), name) is value
        ]
        assert homes, (
            f"jbn.{name} is documented on no API page (add it to the `members:` of the module that defines it)"
        )


def test_reference_docstrings_read_statically():
    griffe = pytest.importorskip("griffe")  # the `docs` extra; the site build reads the code the same way
    package = griffe.load("jbn", search_paths=[str(ROOT)], allow_inspection=False, resolve_aliases=True)
    for module_name, members in documented().items():
        module = package[module_name.removeprefix("jbn.")] if module_name != "jbn" else package
        assert module.docstring, f"{module_name} has no module docstring"
        for member in members:
            obj = module[member]
            assert obj.docstring and obj.docstring.value.strip(), (
                f"{module_name}.{member} has no docstring for the API reference"
            )


# ------------------------------------------------------------------ what the docs point to

REFERENCE = re.compile(
    r"\b((?:tests|jbn|experiments|benchmarks)/[a-z0-9_/]+\.[a-z]+)((?:::\w+)*)"
)  # NAME.py: a placeholder


def test_referenced_files_and_tests_exist():
    # The comparison table names the test that shows each row; a renamed test must not leave it stale.
    missing = []
    for doc in DOC_FILES:
        for path, names in REFERENCE.findall(doc.read_text()):
            target = ROOT / path
            if not target.exists():
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
            elif names and not re.search(rf"^\s*def {names.split('::')[-1]}\(", target.read_text(), flags=re.M):
                missing.append(f"{doc.relative_to(ROOT)}: {path}{names}")
    assert not missing, "the docs name files or tests that do not exist:\n" + "\n".join(missing)


def test_install_guide_names_every_extra():
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    table = (ROOT / "docs" / "guides" / "getting-started.md").read_text()
    listed = set(re.findall(r"^\| `([\w-]+)` \|", table, flags=re.M))
    assert listed == extras, (
        f"getting-started's extras table lists {sorted(listed)}, pyproject.toml has {sorted(extras)}"
    )
