"""Several devices (4 forced CPU devices in a subprocess): the direction equals the single-device one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "multi_device.py"


@pytest.fixture(scope="module")
def results():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_data_parallel_under_jit(results):
    assert results["jit_data"] < 1e-5
    assert results["jit_data_collective"], "the sharded program should reduce across devices"


def test_data_parallel_under_shard_map_with_axis_name(results):
    assert results["shard_map_data"] < 1e-5
    assert results["shard_map_value"] < 1e-12


def test_tangent_parallel(results):
    assert results["tangent_parallel"] < 1e-5
    assert results["tangent_collective"], "tangent sharding should split the K tangents across devices"


def test_recurrent_data_parallel(results):
    assert results["scan_jit_data"] < 1e-5
