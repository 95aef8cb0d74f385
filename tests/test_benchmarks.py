"""The benchmark CLI runs end to end on CPU with tiny shapes (timings are not checked)."""

import pathlib
import sys

import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))

import attention  # noqa: E402


def test_attention_cli_smoke(tmp_path):
  rows = attention.main(["--seq", "128", "--cache-len", "256", "--heads", "4", "--kv-heads", "2",
                         "--kv-heads-decode", "2", "--repeats", "1", "--head-dim", "64",
                         "--causal", "true", "--out", str(tmp_path / "r")])
  assert {r["impl"] for r in rows} == {"jax-xla", "xla"}
  assert all("ms" in r and r["relerr"] < 0.6 for r in rows)
  # Off GPU the "xla" row's quantization pass is timed alone; no kernel split.
  xla_prefill = [r for r in rows if r["suite"] == "prefill" and r["impl"] == "xla"]
  assert xla_prefill and all(r["quant_ms"] > 0 and "kernel_ms" not in r for r in xla_prefill)
  assert (tmp_path / "r.json").exists() and (tmp_path / "r.csv").exists()


def test_attention_cli_reports_the_outlier_error():
  """``--k-outliers``: the design's K-outlier inputs, within their 4e-2 bound."""
  rows = attention.main(["--suite", "prefill", "--seq", "256", "--heads", "4", "--kv-heads", "2",
                         "--repeats", "1", "--causal", "false", "--impls", "xla",
                         "--k-outliers"])
  assert [r["k_outliers"] for r in rows] == [True]
  assert 1e-3 < rows[0]["relerr"] <= 4e-2


def test_tokamax_baselines_are_rows_even_where_they_cannot_run():
  """Without tokamax (CI), or off GPU, its baselines are rows carrying the error;
  the run goes on and writes the other rows."""
  rows = attention.main(["--seq", "128", "--cache-len", "256", "--heads", "4", "--kv-heads", "2",
                         "--kv-heads-decode", "2", "--repeats", "1", "--head-dim", "64",
                         "--causal", "false", "--impls", "xla", "tokamax-int8", "tokamax-int4"])
  by_suite = {(r["suite"], r["impl"]) for r in rows}
  assert {(s, i) for s in ("prefill", "decode") for i in ("tokamax-int8", "tokamax-int4")} <= by_suite
  for r in rows:
    assert ("ms" in r) != ("error" in r), r
  assert all("ms" in r for r in rows if r["impl"] == "xla")


def test_cache_bytes_count_int4_packed():
  codes, scales = jnp.zeros((4, 8), jnp.int4), jnp.zeros((4, 1), jnp.bfloat16)
  assert attention._nbytes((codes, scales)) == 4 * 8 // 2 + 4 * 2


def test_kernel_split_counts_every_other_kernel_as_the_quantization_pass(monkeypatch):
  traced = [("mosaic_gpu_flashq_prefill", 8.0, 10), ("flashq_quantize_v", 0.4, 10),
            ("flashq_quantize_stats", 0.5, 20), ("loop_convert_fusion", 0.1, 10)]
  monkeypatch.setattr(attention.common, "device_kernel_times", lambda *a, **k: traced)
  kernel, rest = attention.kernel_and_quantization_ms(lambda *a: None, calls=10)
  assert abs(kernel - 0.8) < 1e-9 and abs(rest - 0.1) < 1e-9
  monkeypatch.setattr(attention.common, "device_kernel_times", lambda *a, **k: traced[1:])
  assert attention.kernel_and_quantization_ms(lambda *a: None, calls=10) is None
