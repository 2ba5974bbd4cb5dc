"""The activation generator: tokens/s of a jitted Gemma 3 270M forward pass (float32, CPU) capturing all 18
``res`` sites and all 54 sites, against the same forward without extra capture, timed round-robin so that noise
hits all three alike. Run as ``python -m benchmarks.generator --out FILE``; ``--random-weights --model gemma2_2b
--dtype bfloat16 --batch 8 --seq-len 1024`` is the accelerator benchmark (no checkpoint needed).

The baseline captures only ``res`` of the last layer: with ``logits=False`` the model runs exactly the layers up
to the last captured site, so this is the full trunk whose output the model computes anyway (capturing it adds
no work). The unembedding is skipped in every variant, as in activation generation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.common import time_interleaved, worker_args, write_json
from gemma_scope import model
from gemma_scope.sites import parse_sites


def variants(num_layers: int) -> dict[str, list]:
    """Capture lists by variant name: baseline (last res only), every res site, every site."""
    return {"no_capture": parse_sites(f"res.{num_layers - 1}", num_layers),
            "res_all": parse_sites("res.*", num_layers),
            "all_sites": parse_sites("res.*,att.*,mlp.*", num_layers)}


def random_model(name: str, dtype: str = "float32") -> model.LoadedModel:
    """A model of the named architecture (``model.get_config``) with random params in ``dtype``."""
    cfg = model.get_config(name)
    params = jax.tree.map(lambda a: a.astype(dtype), model.init_params(cfg, jax.random.key(0)))
    return model.LoadedModel(cfg, params, make_tokenizer=lambda: None)


def random_tokens(vocab_size: int, batch: int, seq_len: int) -> jax.Array:
    """int32 [batch, seq_len] uniform ids past the special tokens, each sequence led by BOS (id 2)."""
    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len), 3, vocab_size, jnp.int32)
    return tokens.at[:, 0].set(2)


def main() -> None:
    parser = worker_args(__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3_270m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--random-weights", action="store_true", help="random params of the named architecture")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    lm = random_model(args.model, args.dtype) if args.random_weights else model.load(args.model)
    cfg = lm.config
    tokens = random_tokens(cfg.vocab_size, args.batch, args.seq_len)
    result = {"model": args.model, "random_weights": args.random_weights, "device": jax.devices()[0].device_kind,
              "batch": args.batch, "seq_len": args.seq_len,
              "params_dtype": str(jax.tree.leaves(lm.params)[0].dtype), "variants": {}}
    calls, sites_by_name = {}, variants(cfg.num_layers)
    for name, sites in sites_by_name.items():
        fwd = jax.jit(lambda p, t, sites=tuple(sites): model.forward(p, cfg, t, capture=sites, logits=False).acts)
        calls[name] = lambda fwd=fwd: jax.block_until_ready(fwd(lm.params, tokens))
    for name, stats in time_interleaved(calls, args.warmup, args.steps).items():
        result["variants"][name] = dict(stats, n_sites=len(sites_by_name[name]), tokens=tokens.size,
                                        tokens_per_s=tokens.size / stats["median_s"])
    base = result["variants"]["no_capture"]["median_s"]
    for entry in result["variants"].values():
        entry["overhead"] = entry["median_s"] / base - 1.0
    write_json(args.out, result)


if __name__ == "__main__":
    main()
