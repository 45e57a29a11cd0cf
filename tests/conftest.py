"""Test setup: 8 fake CPU devices, made available before any JAX backend starts."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax

jax.config.update("jax_num_cpu_devices", 8)
