"""One process of the multi-process sync-BN test (tests/test_multiprocess.py starts two).

    python -m tests._distributed_worker --process-id I --processes 2 --port PORT --out DIR

Joins the others with `jax.distributed.initialize` (CPU collectives over gloo on
127.0.0.1), each process holding 2 CPU devices, then runs one training step of
`jbn.batch_norm` on the global batch of tests/_sync_reference.make_batch in three styles:
shard_map over the global mesh, plain jit over globally sharded arrays, and pmap over the
local devices (its psum spans every process). It writes this process's rows of the
per-example results and its copy of the replicated ones to DIR/process_I.npz.
"""

from __future__ import annotations

import argparse
import pathlib

import jax

LOCAL_DEVICES = 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    a = parser.parse_args()

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{a.port}",
        num_processes=a.processes,
        process_id=a.process_id,
        initialization_timeout=60,
    )
    try:
        results = run(a.process_id)
    finally:
        jax.distributed.shutdown()
    import numpy as np

    np.savez(a.out / f"process_{a.process_id}.npz", **results)


def run(process_id: int) -> dict:
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jbn
    from tests._sync_reference import EPSILON, MOMENTUM, make_batch

    devices = jax.device_count()
    assert jax.local_device_count() == LOCAL_DEVICES and devices == LOCAL_DEVICES * jax.process_count()
    b = make_batch(devices)
    rows = b.x.shape[0] // jax.process_count()
    own = slice(process_id * rows, (process_id + 1) * rows)

    def loss_and_state(x, mask, w, scale, bias, mean, var, axis_name=None):
        y, new = jbn.batch_norm(
            x,
            scale,
            bias,
            jbn.RunningStats(mean, var),
            training=True,
            momentum=MOMENTUM,
            epsilon=EPSILON,
            mask=mask,
            axis_name=axis_name,
        )
        return jnp.sum(jnp.where(mask[..., None], y, 0) * w), (y, new.mean, new.var)

    def step(x, mask, w, scale, bias, mean, var, axis_name=None):
        grad = jax.grad(loss_and_state, argnums=(0, 3, 4), has_aux=True)
        (dx, dscale, dbias), (y, new_mean, new_var) = grad(x, mask, w, scale, bias, mean, var, axis_name)
        return y, new_mean, new_var, dx, dscale, dbias

    # Device order follows the processes, so process i holds rows `own` of the batch.
    mesh = Mesh(np.array(jax.devices()), ("d",))
    shard, rep = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
    per_example = [jax.make_array_from_process_local_data(shard, a[own]) for a in (b.x, b.mask, b.w)]
    params = [jax.device_put(a, rep) for a in (b.scale, b.bias, b.mean, b.var)]

    def local_part(a):
        """This process's rows of a batch-sharded array, its copy of a replicated one."""
        if isinstance(a, np.ndarray):
            return a
        if a.sharding.is_fully_replicated:
            return np.asarray(a.addressable_data(0))
        shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])

    def collect(style, out):
        return {f"{style}_{k}": local_part(v) for k, v in zip(("y", "mean", "var", "dx", "dscale", "dbias"), out)}

    results = {}

    # shard_map over all devices of all processes; gradients taken inside (check_vma=True).
    f = jax.jit(
        jax.shard_map(
            lambda *t: step(*t, axis_name="d"),
            mesh=mesh,
            in_specs=(P("d"), P("d"), P("d"), P(), P(), P(), P()),
            out_specs=(P("d"), P(), P(), P("d"), P(), P()),
        )
    )
    results.update(collect("shard_map", f(*per_example, *params)))

    # Plain jit over globally sharded arrays, no axis_name.
    g = jax.jit(step)
    results.update(collect("jit", g(*per_example, *params)))

    # pmap over the local devices: its axis spans the devices of every process.
    def pstep(*t):
        y, mean, var, dx, dscale, dbias = step(*t, axis_name="i")
        return y, mean, var, dx, lax.psum(dscale, "i"), lax.psum(dbias, "i")

    p = jax.pmap(pstep, axis_name="i", in_axes=(0, 0, 0, None, None, None, None))
    local = [a[own].reshape((LOCAL_DEVICES, -1) + a.shape[1:]) for a in (b.x, b.mask, b.w)]
    y, mean, var, dx, dscale, dbias = (np.asarray(o) for o in p(*local, b.scale, b.bias, b.mean, b.var))
    results.update(
        collect(
            "pmap",
            (
                y.reshape((rows,) + y.shape[2:]),
                mean[0],
                var[0],
                dx.reshape((rows,) + dx.shape[2:]),
                dscale[0],
                dbias[0],
            ),
        )
    )
    results["pmap_mean_all_local"] = mean
    return results


if __name__ == "__main__":
    main()
