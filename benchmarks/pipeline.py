"""The trainer's input pipeline on the current device: forward-only, step-only and trainer-loop tokens/s for both
activation sources, and the loop as a fraction of what the device allows. Run as
``python -m benchmarks.pipeline --out FILE [--preset auto|gpu|cpu|tiny]`` or ``python -m benchmarks.run --only
pipeline``.

Random weights (throughput does not depend on values) and random token ids (BOS first, every other position a
content token). Presets:

- ``gpu``: Gemma 2 2B, ``res.6/12/18`` × 2 λ, width 16384, batch 4096, 1,024-token contexts, bfloat16 model,
  buffer and SAE matmuls (the shapes of the GPU targets in README.md);
- ``cpu``: the embedded default job's shapes: Gemma 3 270M, ``res.4/8/12`` × 3 λ, width 2048, batch 256,
  256-token contexts, 2 buffer visits, float32; 16-sequence buffers (the job has 64) so that the 80 timed steps
  span several buffer fills;
- ``tiny``: a 7-layer 64-wide Gemma 3, for tests of the harness.

Numbers, each in trained tokens per second (a token visited twice counts twice):

- forward: the jitted forward pass capturing the sites, alone, × passes × content fraction;
- step: the jitted train step of the whole grid on one device-resident batch, alone;
- serial ideal: 1 / (1/forward + 1/step), forward and step back to back with nothing lost between them (each
  timed before and after the loops, the faster kept);
- model loop: ``train.run`` fed by ``ModelSource``, from its ``metrics.jsonl`` (after the first log interval,
  which holds compilation), and ``model_fraction`` = loop / serial ideal (target ≥ 0.9);
- npy loop: ``train.run`` fed by ``NpyShardSource`` on random float32 shards of the first site's width, one
  SAE, and ``npy_fraction`` = loop / its step alone (target ≥ 0.85 on a GPU).
"""

from __future__ import annotations

import json
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import time_calls, worker_args, write_json
from benchmarks.generator import random_model
from gemma_scope import activations, configs, model, train
from gemma_scope import mesh as mesh_lib
from gemma_scope.sites import parse_sites
from gemma_scope.training import settings
from gemma_scope.training import step as step_lib
from gemma_scope.training.grid import Grid, Stack

PRESETS = {
    "gpu": dict(model="gemma2_2b", sites="res.6,res.12,res.18", lambdas=2, width=16384, batch=4096, seq_len=1024,
                chunk_sequences=128, forward_batch=8, passes=1, dtype="bfloat16", steps=96, log_every=16,
                npy_rows=2**18, buffer_rows=2**17),
    "cpu": dict(model="gemma3_270m", sites="res.4,res.8,res.12", lambdas=3, width=2048, batch=256, seq_len=256,
                chunk_sequences=16, forward_batch=8, passes=2, dtype="float32", steps=100, log_every=20,
                npy_rows=2**15, buffer_rows=2**14),
    "tiny": dict(model="gemma3_tiny", sites="res.1,res.3", lambdas=2, width=64, batch=32, seq_len=16,
                 chunk_sequences=8, forward_batch=4, passes=1, dtype="float32", steps=12, log_every=3,
                 npy_rows=256, buffer_rows=128),
}


class RandomTokens:
    """A sequence reader of random token ids: batch k is a pure function of k; BOS first, the rest content."""

    def __init__(self, vocab_size: int, seq_len: int):
        self.vocab_size, self.seq_len = vocab_size, seq_len

    def batch(self, index: int, batch_size: int) -> dict[str, np.ndarray]:
        tokens = np.random.default_rng(index).integers(3, self.vocab_size, (batch_size, self.seq_len), np.int32)
        tokens[:, 0] = 2
        return {"tokens": tokens, "mask": np.arange(self.seq_len)[None].repeat(batch_size, 0) > 0}


def _config(p: dict, workdir: str, data: dict | None = None):
    """The trainer's config for a preset: logs every ``log_every`` steps, one checkpoint at the end."""
    config = configs.train_config(configs.lm_data(p["model"], p["sites"]))
    config.workdir = workdir
    config.data.update(data or {})
    config.sae.width = p["width"]
    config.sae.dtype = p["dtype"]
    config.sae.l0_coefficient = tuple(float(v) for v in np.geomspace(1e-4, 1e-3, p["lambdas"]))
    config.train.update(steps=p["steps"], batch_size=p["batch"], log_every=p["log_every"],
                        checkpoint_every=p["steps"], norm_batches=1, eval_batches=1)
    return config


def loop_tokens_per_s(config, source) -> float:
    """Trained tokens/s of ``train.run`` after its first log interval: total tokens over total time."""
    train.run(config, source)
    records = [json.loads(line) for line in (pathlib.Path(config.workdir) / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["tokens_per_s"] for r in records}
    steps = sorted(rates)[1:]
    seconds = sum(config.train.log_every * config.train.batch_size / rates[s] for s in steps)
    return len(steps) * config.train.log_every * config.train.batch_size / seconds


def step_tokens_per_s(config, stacks: dict[str, Stack], warmup: int, steps: int) -> dict:
    """The grid's train step alone on one device-resident batch of the buffer dtype."""
    mesh = mesh_lib.make_mesh()
    hp = settings.hyperparams(config)
    state = step_lib.init_state(jax.random.key(0), stacks, hp, mesh)
    batch = {g: jax.device_put(jax.random.normal(jax.random.key(1), (s.n_sites, config.train.batch_size, s.d_model),
                                                 jnp.dtype(config.data.buffer_dtype)), mesh_lib.batch_sharding(mesh))
             for g, s in stacks.items()}
    step_fn = step_lib.make_train_step(stacks, hp, mesh)

    def call():
        nonlocal state
        state, _ = step_fn(state, batch)
        jax.block_until_ready(state["step"])

    stats = time_calls(call, warmup, steps)
    return dict(stats, tokens_per_s=config.train.batch_size / stats["median_s"])


def main() -> None:
    parser = worker_args(__doc__.splitlines()[0])
    parser.add_argument("--preset", default="auto", choices=("auto", *PRESETS))
    args = parser.parse_args()
    device = jax.devices()[0]
    name = args.preset if args.preset != "auto" else ("cpu" if device.platform == "cpu" else "gpu")
    p = PRESETS[name]
    lm = random_model(p["model"], p["dtype"])
    cfg = lm.config
    sites = parse_sites(p["sites"], cfg.num_layers)
    d = cfg.site_width(sites[0].kind)
    result = {"device": device.device_kind, "platform": device.platform, "devices": jax.device_count(),
              "preset": name, **p}

    tokens = jnp.asarray(RandomTokens(cfg.vocab_size, p["seq_len"]).batch(0, p["forward_batch"])["tokens"])
    forward = jax.jit(lambda params, t: model.forward(params, cfg, t, capture=tuple(sites), logits=False).acts)
    content = (p["seq_len"] - 1) / p["seq_len"]

    def forward_tokens_per_s() -> dict:
        stats = time_calls(lambda: jax.block_until_ready(forward(lm.params, tokens)), args.warmup, args.steps)
        return dict(stats, tokens_per_s=tokens.size * content * p["passes"] / stats["median_s"])

    with tempfile.TemporaryDirectory() as tmp:
        config = _config(p, f"{tmp}/model", dict(chunk_sequences=p["chunk_sequences"], seq_len=p["seq_len"],
                                                 forward_batch=p["forward_batch"], passes=p["passes"],
                                                 buffer_dtype=p["dtype"]))
        source = activations.ModelSource(lm, RandomTokens(cfg.vocab_size, p["seq_len"]), sites,
                                         chunk_sequences=p["chunk_sequences"], forward_batch=p["forward_batch"],
                                         passes=p["passes"], buffer_dtype=p["dtype"])
        stacks = Grid.build(config, source, settings.sweep_of(config)).stacks
        # Forward and step alone before and after the loop; the faster of each is kept (load only slows them), so
        # a machine whose load changes during the run cannot make the loop look better than it is.
        alone = [(forward_tokens_per_s(), step_tokens_per_s(config, stacks, args.warmup, args.steps))]
        result["model_loop_tokens_per_s"] = loop_tokens_per_s(config, source)
        alone.append((forward_tokens_per_s(), step_tokens_per_s(config, stacks, args.warmup, args.steps)))
        result["forward"], result["step"] = (max((a[i] for a in alone), key=lambda r: r["tokens_per_s"])
                                             for i in range(2))
        result["serial_ideal_tokens_per_s"] = 1 / (1 / result["forward"]["tokens_per_s"] +
                                                   1 / result["step"]["tokens_per_s"])
        result["model_fraction"] = result["model_loop_tokens_per_s"] / result["serial_ideal_tokens_per_s"]

        npy_dir = pathlib.Path(tmp, "npy")
        npy_dir.mkdir()
        rng = np.random.default_rng(0)
        for i in range(4):
            np.save(npy_dir / f"part{i}.npy", rng.standard_normal((p["npy_rows"] // 4, d), np.float32))
        config = _config(p, f"{tmp}/npy", dict(source="npy", path=str(npy_dir), site="", buffer_rows=p["buffer_rows"]))
        config.data.buffer_dtype = "float32"
        config.sae.l0_coefficient = (1e-3,)
        source = activations.make_source(config.data, 0)
        stacks = Grid.build(config, source, settings.sweep_of(config)).stacks
        npy_alone = [step_tokens_per_s(config, stacks, args.warmup, args.steps)]
        result["npy_loop_tokens_per_s"] = loop_tokens_per_s(config, source)
        npy_alone.append(step_tokens_per_s(config, stacks, args.warmup, args.steps))
        result["npy_step"] = max(npy_alone, key=lambda r: r["tokens_per_s"])
        result["npy_fraction"] = result["npy_loop_tokens_per_s"] / result["npy_step"]["tokens_per_s"]
    write_json(args.out, result)


if __name__ == "__main__":
    main()
