"""A byte-level Transformer LM of TurboAttention layers, trained with optax,
then evaluated with quantized attention and a quantized KV cache.

    PYTHONPATH=. python examples/train_lm.py --config small   # 4-5 min on 2 CPU cores
    PYTHONPATH=. python examples/train_lm.py --config gpu     # larger, on a GPU

Steps:
1. Data: the text of ``pydoc_data.topics.topics`` (ships with Python), joined,
   as bytes (vocab 256); the first 90% trains, the last 10% is held out.
2. Train a decoder-only LM (pre-norm RMSNorm, RoPE, GQA, GELU MLP) with
   EXACT attention (``TurboConfig(exact=True)``), adamw + warmup-cosine.
   Checkpoint (orbax, or ``.npz`` without it) under ``checkpoints/``.
3. Held-out perplexity. The held-out bytes are cut into windows of ``W + 1``
   bytes; every row scores the same targets, the second half of each window
   (bytes ``W/2 .. W``; ``W/2 + 1`` predictions per window):
   * exact / INT8+SAS prefill: one causal forward over ``W`` bytes;
   * KV-cache rows: prefill the first ``W/2`` bytes through the cache (the
     prefill itself runs INT8+SAS attention over its float K/V), then decode
     the remaining ``W/2`` bytes one at a time, teacher-forced, each step
     writing its K/V into the quantized cache and attending over it with
     ``turbojax.decode_attention`` (packed INT4/INT2 groups + INT8 window).
     Token by token is what serving does: every group of ``group_size``
     tokens is packed the moment it fills, and each query sees exactly the
     representation its keys have at that step.
4. A short QAT fine-tune through the quantized forward (INT8 + SAS, straight-
   through backward) and the same evaluation.
5. Greedy generation from a held-out prompt with exact attention (float
   cache) and with the INT4 cache; prints both and how many tokens agree.

The table is printed and written to ``benchmarks/results/train_lm_<config>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import turbojax
from turbojax import TurboConfig
from turbojax.flax import TurboAttention

EXACT = TurboConfig(exact=True)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab: int = 256
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2
  mlp_ratio: int = 4
  dtype: str = "float32"        # computation dtype
  param_dtype: str = "float32"


class Block(nnx.Module):
  """Pre-norm block: ``x + attn(norm(x))``, ``x + mlp(norm(x))``."""

  def __init__(self, cfg: ModelConfig, turbo: TurboConfig, *, rngs: nnx.Rngs):
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d = cfg.d_model
    self.norm1 = nnx.RMSNorm(d, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.attn = TurboAttention(cfg.n_heads, d, num_kv_heads=cfg.n_kv_heads, dtype=dt,
                               param_dtype=pdt, use_bias=False, config=turbo, rngs=rngs)
    self.norm2 = nnx.RMSNorm(d, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.up = nnx.Linear(d, cfg.mlp_ratio * d, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.down = nnx.Linear(cfg.mlp_ratio * d, d, dtype=dt, param_dtype=pdt, rngs=rngs)

  def __call__(self, x, *, decode: bool = False):
    x = x + self.attn(self.norm1(x), is_causal=True, decode=decode)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TransformerLM(nnx.Module):
  """Decoder-only LM; ``__call__(tokens [B, T]) -> f32 logits [B, T, vocab]``."""

  def __init__(self, cfg: ModelConfig, turbo: TurboConfig = EXACT, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed = nnx.Embed(cfg.vocab, cfg.d_model, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, turbo, rngs=rngs) for _ in range(cfg.n_layers)])
    self.norm = nnx.RMSNorm(cfg.d_model, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.head = nnx.Linear(cfg.d_model, cfg.vocab, use_bias=False, dtype=dt, param_dtype=pdt,
                           rngs=rngs)

  def __call__(self, tokens, *, decode: bool = False):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, decode=decode)
    return self.head(self.norm(x)).astype(jnp.float32)

  def init_cache(self, batch: int, max_len: int, *, kind: str | None = None, dtype=None):
    for block in self.blocks:
      block.attn.init_cache(batch, max_len, dtype, kind=kind)

  def cache_nbytes(self) -> int:
    return sum(block.attn.kv_cache.get_value().nbytes for block in self.blocks)


def with_turbo(model: TransformerLM, turbo: TurboConfig) -> TransformerLM:
  """A view of ``model`` (same parameter arrays) whose attention uses ``turbo``."""
  return nnx.with_attributes(model, only=TurboAttention, config=turbo)


# ---------------------------------------------------------------------------------------------
# Decoding loops (functional: split once, lax.scan over steps, one compile)
# ---------------------------------------------------------------------------------------------
@nnx.jit
def _prefill(model, tokens):
  return model(tokens, decode=True)[:, -1]


def prefill(model: TransformerLM, tokens):
  """Runs ``tokens`` [B, T] through the caches; returns the last logits [B, V]."""
  return _prefill(model, tokens)


def split_caches(model: TransformerLM):
  """``(graphdef, caches, rest)``: the decoding loops carry only the KV caches,
  so XLA sees the weights as loop invariants (and hoists work on them, such as
  merging the Q/K/V projections, out of the loop)."""
  return nnx.split(model, nnx.Cache, ...)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _teacher_forced(graphdef, caches, rest, tokens, targets):
  def body(caches, xs):
    tok, tgt = xs
    m = nnx.merge(graphdef, caches, rest)
    logits = m(tok[:, None], decode=True)[:, 0]
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[:, None], axis=-1)[:, 0]
    return nnx.state(m, nnx.Cache), lp
  caches, lp = jax.lax.scan(body, caches, (tokens.T, targets.T))
  return caches, lp.T


def teacher_forced_logprobs(model: TransformerLM, tokens, targets):
  """Decodes ``tokens`` [B, n] one at a time (teacher-forced) through the
  caches; returns the log-probabilities of ``targets`` [B, n]."""
  graphdef, caches, rest = split_caches(model)
  caches, lp = _teacher_forced(graphdef, caches, rest, tokens, targets)
  nnx.update(model, caches)
  return lp


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=1)
def greedy_steps(graphdef, caches, rest, tok, n_new: int):
  """``n_new`` greedy decoding steps from ``tok`` [B] (``split_caches``'s
  parts; ``caches`` donated). Returns the new caches, the tokens fed
  [B, n_new] and the next token [B]."""
  def body(carry, _):
    caches, tok = carry
    m = nnx.merge(graphdef, caches, rest)
    nxt = jnp.argmax(m(tok[:, None], decode=True)[:, 0], axis=-1).astype(jnp.int32)
    return (nnx.state(m, nnx.Cache), nxt), tok
  (caches, nxt), toks = jax.lax.scan(body, (caches, tok), None, length=n_new)
  return caches, toks.T, nxt


def greedy_generate(model: TransformerLM, prompt, n_new: int, *, kind: str | None = None):
  """Greedy continuation of ``prompt`` [B, P] by ``n_new`` tokens (fresh caches)."""
  b, p = prompt.shape
  model.init_cache(b, p + n_new, kind=kind)
  first = jnp.argmax(prefill(model, prompt), axis=-1).astype(jnp.int32)
  graphdef, caches, rest = split_caches(model)
  caches, toks, _ = greedy_steps(graphdef, caches, rest, first, n_new)
  nnx.update(model, caches)
  return np.asarray(toks)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_bytes() -> tuple[np.ndarray, np.ndarray]:
  from pydoc_data.topics import topics
  text = "\n\n".join(topics[k] for k in sorted(topics))
  data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
  split = int(0.9 * len(data))
  return data[:split], data[split:]


def batches(data: np.ndarray, seq_len: int, batch: int, seed: int):
  rng = np.random.default_rng(seed)
  while True:
    idx = rng.integers(0, len(data) - seq_len - 1, batch)
    yield np.stack([data[i:i + seq_len + 1] for i in idx])


def eval_windows(data: np.ndarray, window: int, max_windows: int | None) -> np.ndarray:
  n = (len(data) - 1) // window
  if max_windows:
    n = min(n, max_windows)
  return np.stack([data[i * window:i * window + window + 1] for i in range(n)])


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: ModelConfig
  seq_len: int
  batch: int
  steps: int
  lr: float
  warmup: int
  qat_steps: int
  qat_lr: float
  eval_window: int
  eval_batch: int
  max_eval_windows: int | None
  prompt_len: int
  gen_tokens: int
  log_every: int


CONFIGS = {
    # 2 CPU cores: 4-5 minutes end to end.
    "small": RunConfig(
        model=ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2),
        seq_len=256, batch=8, steps=350, lr=3e-3, warmup=35, qat_steps=40, qat_lr=3e-4,
        eval_window=256, eval_batch=96, max_eval_windows=96, prompt_len=96,
        gen_tokens=160, log_every=50),
    # One GPU: a few minutes.
    "gpu": RunConfig(
        model=ModelConfig(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4),
        seq_len=512, batch=32, steps=4000, lr=1e-3, warmup=200, qat_steps=300, qat_lr=1e-4,
        eval_window=512, eval_batch=128, max_eval_windows=None, prompt_len=128,
        gen_tokens=384, log_every=250),
}


def loss_fn(model, batch):
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_optimizer(model, lr: float, warmup: int, steps: int):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1), end_value=lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1))
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, batch):
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss


def train(model, data, run: RunConfig, *, steps: int, lr: float, warmup: int, seed: int,
          label: str):
  optimizer = make_optimizer(model, lr, warmup, steps)
  it = batches(data, run.seq_len, run.batch, seed)
  t0 = time.perf_counter()
  losses = []
  for step in range(1, steps + 1):
    loss = train_step(model, optimizer, jnp.asarray(next(it)))
    losses.append(loss)
    if step % run.log_every == 0 or step == steps:
      recent = float(jnp.mean(jnp.stack(losses[-run.log_every:])))
      print(f"[{label}] step {step:5d}/{steps}  loss {recent:.4f}  "
            f"({time.perf_counter() - t0:.0f}s)", flush=True)
  return float(jnp.mean(jnp.stack(losses[-run.log_every:])))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def save_checkpoint(model, path: pathlib.Path):
  params = nnx.state(model, nnx.Param)
  try:
    import orbax.checkpoint as ocp
  except ImportError:
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(params)}
    np.savez(str(path) + ".npz", **flat)
    return str(path) + ".npz"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path.resolve(), params, force=True)
  return str(path)


def restore_checkpoint(model, path: pathlib.Path) -> bool:
  params = nnx.state(model, nnx.Param)
  if pathlib.Path(str(path) + ".npz").exists():
    npz = np.load(str(path) + ".npz")
    flat = [(k, jnp.asarray(npz["/".join(map(str, k))])) for k, _ in nnx.to_flat_state(params)]
    nnx.update(model, nnx.from_flat_state(flat))
    return True
  if not path.exists():
    return False
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(path.resolve(), params)
  nnx.update(model, restored)
  return True


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def _chunks(windows, size):
  for i in range(0, len(windows), size):
    yield jnp.asarray(windows[i:i + size])


def ppl_forward(model, windows, batch: int) -> float:
  """Perplexity of bytes ``W/2 .. W`` from one causal forward over ``W`` bytes."""
  w = windows.shape[1] - 1
  half = w // 2

  @nnx.jit
  def nll(model, chunk):
    logits = model(chunk[:, :-1])[:, half - 1:]
    return optax.softmax_cross_entropy_with_integer_labels(logits, chunk[:, half:]).sum()

  total = sum(float(nll(model, c)) for c in _chunks(windows, batch))
  return math.exp(total / (len(windows) * (w - half + 1)))


def ppl_cache(model, windows, batch: int, kind: str | None = None) -> float:
  """Perplexity of the same bytes, prefill ``W/2`` then token-by-token decode."""
  w = windows.shape[1] - 1
  half = w // 2
  total = 0.0
  for chunk in _chunks(windows, batch):
    model.init_cache(chunk.shape[0], w, kind=kind)
    last = prefill(model, chunk[:, :half])
    total -= float(jnp.sum(jnp.take_along_axis(
        jax.nn.log_softmax(last), chunk[:, half:half + 1], axis=-1)))
    lp = teacher_forced_logprobs(model, chunk[:, half:w], chunk[:, half + 1:])
    total -= float(jnp.sum(lp))
  return math.exp(total / (len(windows) * (w - half + 1)))


def evaluate(model, windows, run: RunConfig, rows: list, label: str, exact_ppl: float | None,
             *, check_rows: bool = True):
  n_kv = run.model.n_kv_heads
  int4 = TurboConfig()
  mixed = TurboConfig(int2_heads=n_kv // 2)
  cases = [
      ("exact", "forward", lambda: ppl_forward(with_turbo(model, EXACT), windows,
                                                 run.eval_batch)),
      ("exact, float32 KV cache", "prefill + decode",
       lambda: ppl_cache(with_turbo(model, EXACT), windows, run.eval_batch, kind="float")),
      ("TurboAttention INT8+SAS", "forward",
       lambda: ppl_forward(with_turbo(model, int4), windows, run.eval_batch)),
      ("TurboAttention + INT4 KV cache", "prefill + decode",
       lambda: ppl_cache(with_turbo(model, int4), windows, run.eval_batch)),
      (f"TurboAttention + INT4/INT2 cache ({n_kv // 2}/{n_kv} heads INT2)", "prefill + decode",
       lambda: ppl_cache(with_turbo(model, mixed), windows, run.eval_batch)),
  ]
  if not check_rows:  # the float-cache row only checks the decode-evaluation scheme
    cases = [c for c in cases if "float32 KV cache" not in c[0]]
  own_exact = None
  for name, how, fn in cases:
    t0 = time.perf_counter()
    ppl = fn()
    exact_ppl = ppl if exact_ppl is None else exact_ppl
    own_exact = ppl if own_exact is None else own_exact
    rows.append({"model": label, "attention": name, "eval": how, "ppl": ppl,
                     "delta_pct": 100.0 * (ppl / exact_ppl - 1.0),
                     "delta_own_pct": 100.0 * (ppl / own_exact - 1.0),
                     "seconds": time.perf_counter() - t0})
    print(f"  {label:8s} {name:52s} ppl {ppl:7.4f} ({rows[-1]['delta_pct']:+.2f}% vs exact, "
          f"{rows[-1]['delta_own_pct']:+.2f}% vs this model's exact)  [{rows[-1]['seconds']:.0f}s]",
          flush=True)
  return exact_ppl


def format_table(rows) -> str:
  lines = [("| weights | attention | evaluation | held-out ppl | vs exact "
           "| vs same weights, exact |"),
           "| --- | --- | --- | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['attention']} | {r['eval']} | {r['ppl']:.4f} | "
                 f"{r['delta_pct']:+.2f}% | {r['delta_own_pct']:+.2f}% |")
  return "\n".join(lines)


def decode_bytes(tokens) -> str:
  return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
  parser.add_argument("--steps", type=int, default=None, help="override training steps")
  parser.add_argument("--qat-steps", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--restore", action="store_true",
                      help="load <checkpoint-dir>/train_lm_<config>/exact instead of training")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
  parser.add_argument("--checkpoint-dir", default=str(ROOT / "checkpoints"))
  args = parser.parse_args(argv)
  run = CONFIGS[args.config]
  if args.steps is not None:
    run = dataclasses.replace(run, steps=args.steps, warmup=min(run.warmup, args.steps // 5))
  if args.qat_steps is not None:
    run = dataclasses.replace(run, qat_steps=args.qat_steps)
  t_start = time.perf_counter()
  train_data, held_out = load_bytes()
  windows = eval_windows(held_out, run.eval_window, run.max_eval_windows)
  print(f"device {jax.devices()[0].device_kind}; data: {len(train_data)} train / "
        f"{len(held_out)} held-out bytes; {len(windows)} eval windows of {run.eval_window}")

  model = TransformerLM(run.model, EXACT, rngs=nnx.Rngs(args.seed))
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
  print(f"model {run.model} ({n_params / 1e6:.2f}M params)")
  ckpt_dir = pathlib.Path(args.checkpoint_dir) / f"train_lm_{args.config}"
  if args.restore and restore_checkpoint(model, ckpt_dir / "exact"):
    print(f"restored {ckpt_dir / 'exact'}")
    train_loss = float("nan")
  else:
    train_loss = train(model, train_data, run, steps=run.steps, lr=run.lr, warmup=run.warmup,
                       seed=args.seed, label="exact")
    print("saved", save_checkpoint(model, ckpt_dir / "exact"))
  t_train = time.perf_counter() - t_start

  print("held-out perplexity (bytes W/2..W of each window):")
  rows: list[dict] = []
  exact_ppl = evaluate(model, windows, run, rows, "trained", None)

  # QAT: fine-tune through the quantized forward (INT8 + SAS, straight-through backward).
  qat = nnx.clone(with_turbo(model, TurboConfig()))
  t0 = time.perf_counter()
  qat_loss = train(qat, train_data, run, steps=run.qat_steps, lr=run.qat_lr,
                   warmup=max(run.qat_steps // 10, 1), seed=args.seed + 1, label="qat")
  t_qat = time.perf_counter() - t0
  print("saved", save_checkpoint(qat, ckpt_dir / "qat"))
  evaluate(qat, windows, run, rows, "QAT", exact_ppl, check_rows=False)

  # Greedy generation from a held-out prompt: exact (float cache) vs the INT4 cache.
  start = bytes(held_out.astype(np.uint8)).find(b"\n\nThe ") + 2  # a prose paragraph
  prompt = jnp.asarray(held_out[None, start:start + run.prompt_len])
  gen_exact = greedy_generate(with_turbo(model, EXACT), prompt, run.gen_tokens, kind="float")[0]
  gen_int4 = greedy_generate(with_turbo(model, TurboConfig()), prompt, run.gen_tokens)[0]
  same = gen_exact == gen_int4
  prefix = int(np.argmin(same)) if not same.all() else len(same)
  print("\nprompt:", repr(decode_bytes(np.asarray(prompt[0]))))
  print("exact attention   :", repr(decode_bytes(gen_exact)))
  print("INT4 KV cache     :", repr(decode_bytes(gen_int4)))
  print(f"greedy tokens agreeing: {prefix}/{run.gen_tokens} before the first difference, "
        f"{int(same.sum())}/{run.gen_tokens} position-wise")

  table = format_table(rows)
  print("\n" + table)
  result = {
      "config": args.config, "model": dataclasses.asdict(run.model), "params": int(n_params),
      "run": {k: v for k, v in dataclasses.asdict(run).items() if k != "model"},
      "train_loss": train_loss, "qat_loss": qat_loss, "train_seconds": t_train,
      "qat_seconds": t_qat,
      "total_seconds": time.perf_counter() - t_start, "rows": rows,
      "eval": {"windows": len(windows), "window": run.eval_window,
               "targets_per_window": run.eval_window - run.eval_window // 2 + 1},
      "generation": {"prompt": decode_bytes(np.asarray(prompt[0])),
                     "exact": decode_bytes(gen_exact), "int4": decode_bytes(gen_int4),
                     "agree_prefix": prefix, "agree_positions": int(same.sum()),
                     "tokens": run.gen_tokens},
      "device": jax.devices()[0].device_kind, "platform": platform.platform(),
      "jax": jax.__version__, "turbojax": turbojax.__version__}
  out = pathlib.Path(args.out) if args.out else (
      ROOT / "benchmarks" / "results" / f"train_lm_{args.config}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"\nwrote {out} ({result['total_seconds']:.0f}s total)")
  return result


if __name__ == "__main__":
  main()
