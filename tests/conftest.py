"""Test-wide settings: float64 is on so parity checks against dense references reach ~1e-10.

Tests that exercise float32 / half precision pass explicit dtypes.
"""

import jax

jax.config.update("jax_enable_x64", True)
