"""Test configuration: 8 simulated CPU devices for multi-device tests."""

import os
import sys

import jax

# Must run before any JAX computation.
jax.config.update("jax_num_cpu_devices", 8)

# Make ``tests`` helpers importable as plain modules (``import harness``).
sys.path.insert(0, os.path.dirname(__file__))
