"""fold_batch_norm: the folded layer equals layer + BN in eval mode."""

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from tests import reference as ref

EPS = 1e-5


class LayerThenBN(nn.Module):
    """A Dense or Conv followed by BN (fold=False), or the same layer with the BN folded in."""

    make_layer: Any  # keyword arguments -> an unbound nn.Dense / nn.Conv
    fold: bool = False
    bn_kwargs: Any = None

    @nn.compact
    def __call__(self, x):
        if self.fold:
            return self.make_layer(use_bias=True, name="layer")(x)
        x = self.make_layer(name="layer")(x)
        return jbn.BatchNorm(use_running_average=True, name="bn", **(self.bn_kwargs or {}))(x)


def _random_bn(variables, seed):
    """Replace the BN's running statistics and affine parameters with random ones."""
    rng = np.random.default_rng(seed)
    stats = variables["batch_stats"]["bn"]
    c = stats["mean"].shape[0]
    new_stats = {
        "mean": jnp.asarray(rng.normal(size=c) * 2, jnp.float32),
        "var": jnp.asarray(rng.uniform(0.1, 3.0, c), jnp.float32),
    }
    bn_params = {
        k: jnp.asarray(rng.normal(size=c) + (1.0 if k == "scale" else 0.0), jnp.float32)
        for k in variables["params"].get("bn", {})
    }
    params = {**variables["params"]}
    if bn_params:
        params["bn"] = bn_params
    return {"params": params, "batch_stats": {"bn": new_stats}}


def _check_fold(make_layer, x, seed, bn_kwargs=None, epsilon=EPS):
    unfolded = LayerThenBN(make_layer, bn_kwargs=bn_kwargs)
    variables = _random_bn(unfolded.init(jax.random.key(seed), x), seed)
    expected = unfolded.apply(variables, x)
    layer_params = variables["params"]["layer"]
    folded_params = jbn.fold_batch_norm(
        layer_params, variables["params"].get("bn"), variables["batch_stats"]["bn"], epsilon=epsilon
    )
    got = LayerThenBN(make_layer, fold=True).apply({"params": {"layer": folded_params}}, x)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    return variables, got


def test_dense_without_bias_gets_one():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 7)), jnp.float32)
    variables, got = _check_fold(partial(nn.Dense, 4, use_bias=False), x, 0)
    assert "bias" not in variables["params"]["layer"]
    # and against a float64 reference of dense -> BN eval
    p, s = variables["params"], variables["batch_stats"]["bn"]
    expected = ref.normalize(
        ref.f64(x) @ ref.f64(p["layer"]["kernel"]), s["mean"], s["var"], p["bn"]["scale"], p["bn"]["bias"], epsilon=EPS
    )
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def test_conv_nhwc_with_bias():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 6, 3)), jnp.float32)
    _check_fold(partial(nn.Conv, 5, (3, 3), padding="SAME"), x, 1)


def test_grouped_conv():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 5, 4)), jnp.float32)
    _check_fold(partial(nn.Conv, 6, (3, 3), feature_group_count=2, use_bias=False), x, 2)


def test_bn_without_scale_or_bias_and_other_epsilon():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 4, 2)), jnp.float32)
    _check_fold(
        partial(nn.Conv, 3, (2, 2)),
        x,
        3,
        bn_kwargs={"use_scale": False, "use_bias": False, "epsilon": 1e-3},
        epsilon=1e-3,
    )


def test_mismatched_bn_fails_clearly():
    kernel = jnp.ones((3, 4))
    with pytest.raises(ValueError, match="4 output features"):
        jbn.fold_batch_norm({"kernel": kernel}, None, {"mean": jnp.zeros(5), "var": jnp.ones(5)})
    with pytest.raises(ValueError, match="kernel"):
        jbn.fold_batch_norm({"scale": jnp.ones(4)}, None, {"mean": jnp.zeros(4), "var": jnp.ones(4)})
