"""The benchmark CLI runs end to end on CPU with tiny shapes (timings are not checked)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))

import attention  # noqa: E402


def test_attention_cli_smoke(tmp_path):
  rows = attention.main(["--seq", "128", "--cache-len", "256", "--heads", "4", "--kv-heads", "2",
                         "--kv-heads-decode", "2", "--repeats", "1", "--head-dim", "64",
                         "--causal", "true", "--out", str(tmp_path / "r")])
  assert {r["impl"] for r in rows} == {"jax-xla", "xla"}
  assert all("ms" in r and r["relerr"] < 0.6 for r in rows)
  assert (tmp_path / "r.json").exists() and (tmp_path / "r.csv").exists()
