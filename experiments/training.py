"""The shared training loop: optax, jitted steps, several seeds at once, a progress bar.

`fit` trains one network for several seeds. For MLPs the per-seed step is `vmap`ped over
seeds and `lax.scan`ned over the steps between two evaluations, so each arm compiles once
and Python runs once per evaluation, not once per step; conv nets run seed by seed with one
jitted step per dispatch (faster on XLA:CPU, see `fit`). Every seed has its own
initialization, data order, dropout and noise keys, all derived from the seed, so a run is
reproducible (on the same machine and library versions).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from tqdm.auto import tqdm

from experiments.data import Dataset, batch_indices

OPTIMIZERS = ("sgd", "momentum", "adam")
# Added to every data-order seed `fit` uses: the reproducibility reruns set it (CLI option
# --order-seed-offset) to train the same initializations on a different set of batch orders.
ORDER_SEED_OFFSET = 0


class TrainState(NamedTuple):
    """Everything that changes during training (one seed, or stacked over seeds).

    Attributes:
      params: the `params` collection.
      batch_stats: the `batch_stats` collection ({} for networks without batch norm).
      opt_state: the optax state.
    """

    params: Any
    batch_stats: Any
    opt_state: Any


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.9) -> optax.GradientTransformation:
    """An optax optimizer by config name.

    Args:
      name: "sgd" (plain), "momentum" (SGD with heavy-ball momentum) or "adam".
      learning_rate: step size.
      momentum: heavy-ball coefficient for "momentum".
    """
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=momentum)
    if name == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"`optimizer`={name!r}: use one of {', '.join(OPTIMIZERS)}.")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy; logits (N, K), labels (N,) int."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def variables_of(state: TrainState) -> dict:
    """The flax variables dict of `state`."""
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


def init_state(
    model: nn.Module, optimizer: optax.GradientTransformation, key: jax.Array, sample_x: jax.Array
) -> TrainState:
    """A fresh TrainState for one seed. `sample_x` is a batch with the input shape."""
    variables = model.init({"params": key}, sample_x, train=False)
    params = variables["params"]
    return TrainState(params, variables.get("batch_stats", {}), optimizer.init(params))


def rngs_for(key: jax.Array) -> dict:
    """The rng streams a training forward may draw from: dropout masks and BN noise."""
    dropout, noise = jax.random.split(key)
    return {"dropout": dropout, "noise": noise}


def training_loss(model: nn.Module, params, batch_stats, x, y, key):
    """Loss of one batch in training mode -> (loss, (new batch_stats, logits))."""
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    logits, updates = model.apply(variables, x, train=True, rngs=rngs_for(key), mutable=["batch_stats"])
    return cross_entropy(logits, y), (updates.get("batch_stats", batch_stats), logits)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation) -> Callable:
    """`step(state, x, y, key) -> (state, {"loss", "accuracy"})` for one seed (not jitted)."""

    def step(state: TrainState, x, y, key):
        grad_fn = jax.value_and_grad(training_loss, argnums=1, has_aux=True)
        (loss, (batch_stats, logits)), grads = grad_fn(model, state.params, state.batch_stats, x, y, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, batch_stats, opt_state), {"loss": loss, "accuracy": accuracy(logits, y)}

    return step


def make_evaluate(model: nn.Module) -> Callable:
    """`evaluate(state, x, y) -> {"loss", "accuracy"}` in eval mode (running statistics)."""

    def evaluate(state: TrainState, x, y):
        logits = model.apply(variables_of(state), x, train=False)
        return {"loss": cross_entropy(logits, y), "accuracy": accuracy(logits, y)}

    return evaluate


@dataclasses.dataclass
class Run:
    """What `fit` returns.

    Attributes:
      seeds: the seeds, in the order of every leading seed axis below.
      steps: (T,) the steps at which the metrics were taken (0 = at initialization).
      series: metric name -> array (T, S, ...): train_loss/train_accuracy (means over the
        steps since the previous evaluation; NaN at step 0), test_loss/test_accuracy (eval
        mode, whole test set), and whatever the probe returned.
      state: the final TrainState, every leaf stacked over seeds.
      seconds: wall-clock time of the training loop (compilation included).
      order_seeds: the seeds of the data orders, one per seed.
    """

    seeds: list[int]
    steps: np.ndarray
    series: dict[str, np.ndarray]
    state: TrainState
    seconds: float
    order_seeds: list[int] | None = None

    def final(self, name: str) -> np.ndarray:
        """(S, ...) the metric at the last evaluation."""
        return self.series[name][-1]

    def rows(self, **extra) -> list[dict]:
        """Long-format rows (one per evaluation step, seed and scalar metric) for metrics.csv."""
        out = []
        order_seeds = self.order_seeds or self.seeds
        for t, step in enumerate(self.steps):
            for s, seed in enumerate(self.seeds):
                for name, values in self.series.items():
                    v = values[t, s]
                    if np.ndim(v) == 0:
                        out.append(
                            {
                                **extra,
                                "seed": seed,
                                "order_seed": order_seeds[s],
                                "step": int(step),
                                "metric": name,
                                "value": float(v),
                            }
                        )
        return out


def first_step_reaching(run: Run, threshold: float, metric: str = "test_accuracy") -> np.ndarray:
    """(S,) first evaluated step where `metric` >= threshold, NaN for a seed that never does."""
    values = run.series[metric]
    out = np.full(values.shape[1], np.nan)
    for s in range(values.shape[1]):
        hits = np.flatnonzero(values[:, s] >= threshold)
        if hits.size:
            out[s] = run.steps[hits[0]]
    return out


def _over_seeds(f: Callable, vectorize: bool, in_axes=0) -> Callable:
    """`f` (for one seed) applied to arguments stacked over seeds: `jax.vmap` when
    `vectorize`, else a squeeze/unsqueeze around one seed (leading axis of size 1)."""
    if vectorize:
        return jax.vmap(f, in_axes=in_axes)
    axes = in_axes if isinstance(in_axes, tuple) else None

    def one_seed(*args):
        squeezed = [
            a if axes is not None and axes[i] is None else jax.tree.map(lambda v: v[0], a) for i, a in enumerate(args)
        ]
        return jax.tree.map(lambda v: v[None], f(*squeezed))

    return one_seed


def _merge_runs(runs: list[Run]) -> Run:
    """Runs of single seeds -> one Run stacked over seeds."""
    series = {k: np.concatenate([r.series[k] for r in runs], axis=1) for k in runs[0].series}
    state = jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *[r.state for r in runs])
    return Run(
        [s for r in runs for s in r.seeds],
        runs[0].steps,
        series,
        state,
        sum(r.seconds for r in runs),
        [o for r in runs for o in r.order_seeds],
    )


def fit(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    data: Dataset,
    *,
    seeds: list[int],
    steps: int,
    batch_size: int,
    eval_every: int,
    order: str = "shuffle",
    classes_per_batch: int = 2,
    order_seeds: list[int] | None = None,
    probe: Callable[[TrainState, jax.Array], dict] | None = None,
    desc: str = "",
    progress: bool = True,
    vmap_seeds: bool = True,
    scan_steps: bool = True,
) -> Run:
    """Train `model` on `data` for every seed in `seeds`, evaluating every `eval_every` steps.

    Args:
      model: a flax module called as `model.apply(variables, x, train=...)`.
      optimizer: the optax transformation.
      data: the data set (NumPy arrays; moved to the device once).
      seeds: one training run per seed.
      steps: optimizer steps per run.
      batch_size: examples per step.
      eval_every: steps between evaluations.
      order, classes_per_batch: the batch order (see `data.batch_indices`).
      order_seeds: seeds of the data orders, default `seeds` (pass equal init seeds and
        different order seeds to vary only the order).
      probe: optional `probe(state, key) -> dict of arrays` for ONE seed, run (jitted) at
        every evaluation; its outputs join `Run.series`.
      desc: progress-bar label.
      progress: show the tqdm progress bar (TQDM_DISABLE=1 also hides it).
      vmap_seeds: train the seeds together under `jax.vmap` (fast for MLPs); False trains
        them one after the other (better for conv nets: on XLA:CPU a vmapped convolution
        with per-seed kernels becomes a slow grouped convolution).
      scan_steps: run the steps between evaluations in one jitted `lax.scan` (fewest
        dispatches, fast for MLPs); False dispatches one jitted step per step (better for
        conv nets: XLA:CPU runs convolutions inside a loop several times slower).
    """
    if eval_every <= 0 or steps <= 0:
        raise ValueError(f"`steps`={steps} and `eval_every`={eval_every} must be positive.")
    order_seeds = list(seeds) if order_seeds is None else list(order_seeds)
    order_seeds = [int(o) + ORDER_SEED_OFFSET for o in order_seeds]
    if len(order_seeds) != len(seeds):
        raise ValueError(f"`order_seeds` has {len(order_seeds)} entries for {len(seeds)} seeds: give one per seed.")
    options = dict(
        steps=steps,
        batch_size=batch_size,
        eval_every=eval_every,
        order=order,
        classes_per_batch=classes_per_batch,
        progress=progress,
        scan_steps=scan_steps,
    )
    fns = _Compiled(model, optimizer, probe, vmap_seeds)  # shared by all seeds: one compilation
    if vmap_seeds or len(seeds) == 1:
        return _fit(fns, data, seeds=list(seeds), order_seeds=order_seeds, desc=desc, **options)
    runs = [
        _fit(fns, data, seeds=[s], order_seeds=[o], desc=f"{desc} seed {s}", **options)
        for s, o in zip(seeds, order_seeds)
    ]
    return _merge_runs(runs)


class _Compiled:
    """The jitted functions of one `fit` call, over a leading seed axis. The per-seed keys
    are arguments (not closed over), so seeds trained one after the other share them."""

    def __init__(self, model, optimizer, probe, vectorize: bool):
        seeds_step = _over_seeds(make_train_step(model, optimizer), vectorize)

        def one_step(state, run_keys, x_all, y_all, idx_t, t):
            """One step of every seed; idx_t (S, B) batch indices, t the step number."""
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(run_keys, t)
            return seeds_step(state, x_all[idx_t], y_all[idx_t], step_keys)

        def chunk(state, run_keys, x_all, y_all, idx, ts):
            state, metrics = jax.lax.scan(lambda st, inp: one_step(st, run_keys, x_all, y_all, *inp), state, (idx, ts))
            return state, jax.tree.map(lambda m: m.mean(0), metrics)

        def init(keys, sample):
            # Eagerly, seed by seed: compiling a (vmapped) flax init costs seconds on CPU,
            # far more than running it.
            states = [init_state(model, optimizer, k, sample) for k in keys]
            return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

        self.init = init
        self.train_chunk = jax.jit(chunk)
        self.train_step = jax.jit(one_step)
        self.evaluate = jax.jit(_over_seeds(make_evaluate(model), vectorize, in_axes=(0, None, None)))
        self.probe = None if probe is None else jax.jit(_over_seeds(probe, vectorize))


def fit_from_config(model: nn.Module, data: Dataset, config: dict, **options: Any) -> Run:
    """`fit` with the optimizer, seeds, steps, batch size and evaluation interval a config
    gives (keys `optimizer`, `learning_rate`, `seeds`, `steps`, `batch_size`, `eval_every`);
    `options` are `fit`'s other keywords, or override those."""
    keys = ("seeds", "steps", "batch_size", "eval_every")
    settings = {key: options.pop(key) if key in options else config[key] for key in keys}
    return fit(model, make_optimizer(config["optimizer"], config["learning_rate"]), data, **settings, **options)


def _fit(
    fns: _Compiled,
    data,
    *,
    seeds,
    order_seeds,
    steps,
    batch_size,
    eval_every,
    order,
    classes_per_batch,
    desc,
    progress,
    scan_steps,
) -> Run:
    start = time.perf_counter()
    n_seeds = len(seeds)
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    init_keys, run_keys, probe_base = jax.vmap(lambda k: jax.random.split(k, 3), out_axes=1)(keys)
    state = fns.init(init_keys, x_train[:batch_size])
    indices = np.stack(
        [batch_indices(data.y_train, batch_size, steps, s, order, classes_per_batch) for s in order_seeds], axis=1
    )  # (steps, S, B)
    train_chunk, train_step, evaluate, run_probe = fns.train_chunk, fns.train_step, fns.evaluate, fns.probe

    history: dict[str, list] = {}

    def record(state, t, train_metrics):
        nan = np.full(n_seeds, np.nan)
        values = {
            "train_loss": nan if train_metrics is None else np.asarray(train_metrics["loss"]),
            "train_accuracy": nan if train_metrics is None else np.asarray(train_metrics["accuracy"]),
        }
        test = evaluate(state, x_test, y_test)
        values["test_loss"], values["test_accuracy"] = np.asarray(test["loss"]), np.asarray(test["accuracy"])
        if run_probe is not None:
            probe_keys = jax.vmap(jax.random.fold_in, (0, None))(probe_base, t)
            values.update({k: np.asarray(v) for k, v in run_probe(state, probe_keys).items()})
        for k, v in values.items():
            history.setdefault(k, []).append(v)
        return values

    eval_steps = [0]
    record(state, 0, None)
    # Without an explicit `disable`, tqdm's environment settings (TQDM_DISABLE=1) apply.
    bar_options = {} if progress else {"disable": True}
    bar = tqdm(total=steps, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5, **bar_options)
    done = 0
    while done < steps:
        n = min(eval_every, steps - done)
        if scan_steps:
            ts = jnp.arange(done, done + n)
            state, train_metrics = train_chunk(
                state, run_keys, x_train, y_train, jnp.asarray(indices[done : done + n]), ts
            )
        else:
            per_step = []
            for t in range(done, done + n):
                state, m = train_step(state, run_keys, x_train, y_train, jnp.asarray(indices[t]), t)
                per_step.append(m)
            train_metrics = jax.tree.map(lambda *ms: jnp.mean(jnp.stack(ms), axis=0), *per_step)
        done += n
        values = record(state, done, train_metrics)
        eval_steps.append(done)
        bar.update(n)
        bar.set_postfix(
            loss=f"{np.nanmean(values['train_loss']):.3f}", test_acc=f"{np.nanmean(values['test_accuracy']):.3f}"
        )
    bar.close()
    series = {k: np.stack(v) for k, v in history.items()}
    return Run(list(seeds), np.asarray(eval_steps), series, state, time.perf_counter() - start, list(order_seeds))


def seed_slice(state: TrainState, s: int) -> TrainState:
    """The TrainState of the s-th seed of a stacked state."""
    return jax.tree.map(lambda leaf: leaf[s], state)
