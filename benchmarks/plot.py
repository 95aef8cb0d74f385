"""Draws PNG charts from a benchmarks/attention.py JSON file.

  python benchmarks/plot.py benchmarks/results/h100.json
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("results", type=pathlib.Path)
  args = parser.parse_args(argv)
  data = json.loads(args.results.read_text())
  rows = [r for r in data["rows"] if "speedup_vs_cudnn" in r]
  for suite in ("prefill", "decode"):
    suite_rows = [r for r in rows if r["suite"] == suite]
    if not suite_rows:
      continue
    if suite == "prefill":
      labels = [f"{r['impl']}\nT{r['seq']}{' causal' if r['causal'] else ''}" for r in suite_rows]
    else:
      labels = [f"{r['impl']}\n{r['cache']}" for r in suite_rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels)), 4))
    ax.bar(range(len(labels)), [r["speedup_vs_cudnn"] for r in suite_rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("speed-up vs cuDNN bf16")
    ax.set_title(f"{suite} on {data['meta']['device_kind']} (jax {data['meta']['jax']})")
    fig.tight_layout()
    out = args.results.with_name(f"{args.results.stem}_{suite}.png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
  main()
