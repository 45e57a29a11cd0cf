"""The experiments, in the order of the report: number, name, what it tests.

Experiment NAME lives in `experiments/NAME.py` (module-level `DEFAULTS: dict` and
`run(config: dict, out_dir: pathlib.Path) -> dict`, optionally `TINY: dict` of overrides
that make it a few-step smoke run) and its default config in `configs/NAME.yaml`.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"


class Entry(NamedTuple):
    number: int
    name: str
    title: str


EXPERIMENTS = (
    Entry(0, "bn_benefit", "Experiment zero: does BN help a deep plain net on MNIST-1D? Rates tuned on validation"),
    Entry(1, "ioffe_fig1", "Ioffe & Szegedy 2015 Fig. 1: accuracy and sigmoid-input percentiles, BN vs none"),
    Entry(2, "learning_rates", "BN allows higher learning rates: both arms sweep the same grid"),
    Entry(3, "conv_speed", "Steps to a target accuracy on a conv net, BN vs none, over seeds"),
    Entry(4, "bn_placement", "BN before vs after the activation; a bias before BN is redundant"),
    Entry(
        5,
        "small_batches",
        "Small statistics batches (conv net): BN vs Batch Renorm, GroupNorm; ghost BN for large batches",
    ),
    Entry(6, "ics_smoothness", "Internal covariate shift vs smoothness (Santurkar et al. 2018)"),
    Entry(
        7,
        "deep_gradients",
        "Gradients in deep BN nets without skips, at init and in training, ReLU and sigmoid (Yang et al. 2019)",
    ),
    Entry(8, "dropout_variance", "Dropout before BN: variance shift (Li et al. 2019), with a no-BN dropout control"),
    Entry(9, "eval_statistics", "Evaluation statistics: EMA vs exact population vs batch statistics"),
    Entry(10, "sync_bn", "Sync BN across 8 devices with 2-8 examples each"),
    Entry(11, "batch_order", "Batch order and non-i.i.d. batches, BN vs Batch Renorm"),
    Entry(12, "regularization", "Does BN regularize? Train-test gap at matched training loss, BN vs none vs dropout"),
    Entry(13, "init_scale", "Sensitivity to the scale of the weight initialization, BN vs none"),
    Entry(14, "gamma_beta", "gamma/beta on and off (use_scale/use_bias), what they learn, epsilon"),
    Entry(15, "per_channel", "Per-channel vs per-activation statistics in a conv net"),
    Entry(16, "weight_decay", "Weight decay, scale invariance and the effective learning rate lr/||W||^2"),
    Entry(17, "step_cost", "BN's cost per training step at the experiments' sizes"),
)
BY_NAME = {e.name: e for e in EXPERIMENTS}


def module_name(name: str) -> str:
    return f"experiments.{name}"


def is_available(name: str) -> bool:
    """Whether experiments/NAME.py exists (experiment 10 comes from another issue)."""
    return importlib.util.find_spec(module_name(name)) is not None


def load_module(name: str):
    """The experiment module NAME; a clear error when it does not exist (yet)."""
    if not is_available(name):
        known = ", ".join(e.name for e in EXPERIMENTS)
        if name in BY_NAME:
            raise LookupError(
                f"experiment '{name}' is registered but experiments/{name}.py has not landed yet (waiting for it)."
            )
        raise LookupError(f"no experiment '{name}' (no experiments/{name}.py); known experiments: {known}.")
    module = importlib.import_module(module_name(name))
    for attr in ("DEFAULTS", "run"):
        if not hasattr(module, attr):
            raise LookupError(
                f"experiments/{name}.py has no `{attr}`: an experiment module defines DEFAULTS and run(config, out_dir)."
            )
    return module


def config_path(name: str) -> pathlib.Path:
    return CONFIG_DIR / f"{name}.yaml"
