"""Sharded == single-device, on 8 simulated CPU devices in a separate process."""

import os
import pathlib
import subprocess
import sys


def test_sharded_equals_unsharded_on_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = pathlib.Path(__file__).parent.parent
  env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
  result = subprocess.run([sys.executable, str(pathlib.Path(__file__).parent / "sharding_check.py")],
                          env=env, capture_output=True, text=True, timeout=600)
  print(result.stdout)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "prefill sharded == unsharded" in result.stdout
  assert "decode sharded == unsharded" in result.stdout
  assert "update sharded == unsharded" in result.stdout
