"""Which jbn features an arm needs, and whether they have landed.

Some arms use names that other issues add to jbn (ghost batches, Batch Renorm, exact
population statistics). Until a name exists, the arm is not run: its rows in metrics.csv
and its lines in summary.md say `waiting for <feature>` instead of a number.
"""

from __future__ import annotations

import dataclasses
import importlib

import jbn


def _has_field(cls, name: str) -> bool:
    return dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}


# feature key -> (what a reader should wait for, test that it is there)
FEATURES = {
    "ghost": ("virtual_batch_size= on jbn.BatchNorm", lambda: _has_field(jbn.BatchNorm, "virtual_batch_size")),
    "renorm": ("jbn.BatchRenorm", lambda: hasattr(jbn, "BatchRenorm")),
    "recompute": ("jbn.recompute_batch_stats", lambda: hasattr(jbn, "recompute_batch_stats")),
    "sync_bn": ("experiments/sync_bn.py", lambda: importlib.util.find_spec("experiments.sync_bn") is not None),
}

# norm kind (models.NORMS) -> feature it needs
NORM_FEATURES = {"ghost": "ghost", "renorm": "renorm"}


def waiting(feature: str | None) -> str | None:
    """None when `feature` is available (or None), else the marker 'waiting for <feature>'."""
    if feature is None:
        return None
    label, present = FEATURES[feature]
    return None if present() else f"waiting for {label}"


def waiting_for_norm(kind: str) -> str | None:
    """The waiting marker for a normalization kind, or None when it can run."""
    return waiting(NORM_FEATURES.get(kind))


def is_waiting(status: str | None) -> bool:
    return bool(status) and status.startswith("waiting for")
