"""Checks of the built distributions (make dist).

`python .ci/check_dist.py dist/`: the wheel and the sdist carry py.typed, the version module and
the LICENSE, and both have the version of jbn/_version.py.
`python .ci/check_dist.py --installed`: run in a fresh virtual environment holding only the wheel
and its runtime dependencies; `import jbn` and the pure functions work there and load no framework.
"""

from __future__ import annotations

import pathlib
import sys
import tarfile
import zipfile


def check_files(dist: pathlib.Path) -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    version = {}
    exec((root / "jbn" / "_version.py").read_text(), version)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, f"expected one wheel and one sdist in {dist}, found {wheels + sdists}"
    with zipfile.ZipFile(wheels[0]) as archive:
        wheel = archive.namelist()
    with tarfile.open(sdists[0]) as archive:
        sdist = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
    problems = [f"the wheel lacks {n}" for n in ("jbn/py.typed", "jbn/_version.py") if n not in wheel]
    problems += [] if any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel) else ["the wheel lacks the LICENSE"]
    problems += [
        f"the sdist lacks {n}" for n in ("LICENSE", "README.md", "jbn/py.typed", "pyproject.toml") if n not in sdist
    ]
    problems += [
        f"{p.name} is not version {version['__version__']}"
        for p in wheels + sdists
        if f"-{version['__version__']}" not in p.name
    ]
    if problems:
        sys.exit("make dist: " + "; ".join(problems))
    print(f"{wheels[0].name}, {sdists[0].name}: py.typed, LICENSE and version {version['__version__']} present")


def check_installed() -> None:
    import importlib.resources

    import jax.numpy as jnp

    import jbn

    x = jnp.arange(24.0).reshape(4, 3, 2)
    running = jbn.RunningStats(jnp.zeros(2), jnp.ones(2))
    y, running = jbn.batch_norm(x, jnp.ones(2), jnp.zeros(2), running, training=True, momentum=0.9)
    assert y.shape == x.shape and running.mean.shape == (2,)
    frameworks = sorted(m for m in ("flax", "equinox", "torch", "keras", "optax") if m in sys.modules)
    assert not frameworks, f"`import jbn` and jbn.batch_norm loaded {frameworks}: they must stay optional extras"
    assert importlib.resources.files("jbn").joinpath("py.typed").is_file(), "py.typed is not installed"
    print(f"jbn {jbn.__version__} from the wheel: the pure layer works with its runtime dependencies alone")


if __name__ == "__main__":
    if sys.argv[1:] == ["--installed"]:
        check_installed()
    elif len(sys.argv) == 2:
        check_files(pathlib.Path(sys.argv[1]))
    else:
        sys.exit("usage: python .ci/check_dist.py DIST_FOLDER | --installed")
