"""Evaluation throughput: tokens/s of the per-token NLL pass (``model.token_nll``) clean and with a random SAE
spliced in at one site (``splice.delta_lm_loss``'s two passes), timed round-robin. Run as
``python -m benchmarks.evaluation --out FILE [--model gemma2_2b --dtype bfloat16 --batch 8 --seq-len 1024]``;
random weights, random token ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.common import time_interleaved, worker_args, write_json
from benchmarks.generator import random_model, random_tokens
from gemma_scope import model, sae
from gemma_scope.evaluation import splice
from gemma_scope.sites import Site


def main() -> None:
    parser = worker_args(__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma2_2b")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--width", type=int, default=16384)
    args = parser.parse_args()
    lm = random_model(args.model, args.dtype)
    cfg = lm.config
    site = Site("res", cfg.num_layers // 2)
    tokens = random_tokens(cfg.vocab_size, args.batch, args.seq_len)
    mask = jnp.ones(tokens.shape, bool).at[:, 0].set(False)
    sae_params = sae.init_params(jax.random.key(1), cfg.site_width("res"), args.width)
    clean = jax.jit(lambda p, t: model.token_nll(p, cfg, t))
    calls = {"clean": lambda: jax.block_until_ready(clean(lm.params, tokens)),
             "spliced": lambda: jax.block_until_ready(splice.spliced_pass(lm.params, cfg, tokens, mask, site,
                                                                            sae_params))}
    result = {"device": jax.devices()[0].device_kind, "model": args.model, "dtype": args.dtype, "batch": args.batch,
              "seq_len": args.seq_len, "site": str(site), "width": args.width, "passes": {}}
    for name, stats in time_interleaved(calls, args.warmup, args.steps).items():
        result["passes"][name] = dict(stats, tokens_per_s=tokens.size / stats["median_s"])
    write_json(args.out, result)


if __name__ == "__main__":
    main()
