"""The command line: run one experiment from its config, or list them.

    python -m experiments list
    python -m experiments run configs/NAME.yaml [--override key=value ...] [--tiny] [--runs-dir runs]

`run` resolves the config (file, then overrides, each checked against the experiment's
DEFAULTS), writes runs/NAME/config.yaml, calls the experiment's `run(config, out_dir)`,
which writes metrics.csv, PNG figures and summary.md, then prints the verdict, the table
and the figures' paths. Set TQDM_DISABLE=1 to hide the progress bars.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from experiments import config as cfg
from experiments import external, registry


def _use_eight_cpu_devices() -> None:
    """8 fake CPU devices (the sync BN experiment needs them); must run before JAX starts."""
    try:
        import jax

        jax.config.update("jax_num_cpu_devices", 8)
    except Exception:  # the backend already started (e.g. called from a test): keep its devices
        pass


def resolve(config_file: str | pathlib.Path, overrides=(), tiny: bool = False):
    """(name, module, resolved config) for a config file; errors name the key and the file."""
    path = pathlib.Path(config_file)
    name = path.stem
    module = registry.load_module(name)
    defaults = module.DEFAULTS
    config = cfg.load(path, defaults)
    if cfg.CRITERIA not in config:
        raise cfg.ConfigError(
            f"{path}: no `criteria:` block. Every experiment config states its criteria before it is run "
            "(see experiments/protocol.py)."
        )
    if tiny:
        tiny_overrides = getattr(module, "TINY", None) or external.TINY.get(name)
        if tiny_overrides is None:
            raise cfg.ConfigError(f"experiments/{name}.py defines no TINY settings, so --tiny cannot shrink it.")
        config = cfg.resolve(defaults, {**config, **tiny_overrides}, where=f"experiments/{name}.py TINY")
    config = cfg.apply_overrides(config, defaults, overrides)
    return name, module, config


def prepare_out_dir(out_dir: pathlib.Path) -> None:
    """Create runs/NAME and remove the outputs of an earlier run of it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if old.is_file() and old.suffix in (".png", ".csv", ".md", ".yaml"):
            old.unlink()


def run_experiment(config_file, overrides=(), *, tiny: bool = False, runs_dir: str | pathlib.Path = "runs") -> dict:
    """Resolve, run and document one experiment; returns the experiment's result dict."""
    name, module, config = resolve(config_file, overrides, tiny)
    out_dir = pathlib.Path(runs_dir) / name
    prepare_out_dir(out_dir)
    (out_dir / "config.yaml").write_text(cfg.dump(config))
    start = time.perf_counter()
    result = module.run(config, out_dir) or {}
    result = dict(result)
    result.setdefault("name", name)
    result["seconds"] = time.perf_counter() - start
    result["out_dir"] = str(out_dir)
    if not (out_dir / "summary.md").exists() and name in external.REPORTS:
        # A module from another issue: its registered report states the criteria and the verdict.
        result = {**result, **external.REPORTS[name](config, result, out_dir)}
    if not (out_dir / "summary.md").exists():  # an experiment that writes no summary of its own
        lines = [f"# {name}", "", "Result returned by `run`:", ""]
        lines += [f"- **{k}**: {v}" for k, v in result.items() if k not in ("table",)]
        if "table" in result:
            lines += ["", str(result["table"])]
        lines += ["", *(f"![{p.stem}]({p.name})" for p in sorted(out_dir.glob("*.png")))]
        (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    result.setdefault("figures", [str(p) for p in sorted(out_dir.glob("*.png"))])
    result.setdefault("summary", str(out_dir / "summary.md"))
    return result


def print_result(result: dict) -> None:
    print()
    print(f"== {result['name']}: done in {result['seconds']:.0f} s -> {result['out_dir']}/")
    if result.get("table"):
        print()
        print(result["table"])
        print()
    if "verdict" in result:
        print(f"Verdict: {result['verdict']}")
    for fig in result.get("figures", []):
        print(f"Figure:  {fig}")
    print(f"Summary: {result['summary']}")


def list_experiments() -> None:
    print(f"{'#':>2}  {'name':<18} {'status':<40} what it tests")
    for e in registry.EXPERIMENTS:
        if not registry.is_available(e.name):
            status = f"waiting for experiments/{e.name}.py"
        elif not registry.config_path(e.name).exists():
            status = f"waiting for configs/{e.name}.yaml"
        else:
            status = f"configs/{e.name}.yaml"
        print(f"{e.number:>2}  {e.name:<18} {status:<40} {e.title}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description="Batch-norm experiments (jbn).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments and their configs")
    p = sub.add_parser("run", help="run one experiment from its YAML config")
    p.add_argument("config", help="configs/NAME.yaml")
    p.add_argument(
        "--override",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one config key (value read as YAML); repeatable",
    )
    p.add_argument("--tiny", action="store_true", help="apply the experiment's TINY settings (a few-step smoke run)")
    p.add_argument("--runs-dir", default="runs", help="parent of the output folder runs/NAME (default: runs)")
    p.add_argument(
        "--order-seed-offset",
        type=int,
        default=0,
        metavar="K",
        help="add K to every data-order seed (same initializations, other batch orders: the reproducibility reruns)",
    )
    args = parser.parse_args(argv)
    if args.command == "list":
        list_experiments()
        return 0
    _use_eight_cpu_devices()
    from experiments import training

    training.ORDER_SEED_OFFSET = args.order_seed_offset
    try:
        result = run_experiment(args.config, args.override, tiny=args.tiny, runs_dir=args.runs_dir)
    except (cfg.ConfigError, LookupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_result(result)
    return 0
