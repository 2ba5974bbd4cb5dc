"""Attribution graph of one prompt on the embedded Gemma 3 270M: wall time by phase and peak memory, for one prompt
length per process (so that the peak resident memory is that length's). Run as
``python -m benchmarks.attribution --out FILE --tokens 16 [--transcoders DIR]``.

Phases, as ``python -m gemma_scope.attribute`` runs them: ``prepare`` (the model's pass with the transcoders, jit
compile included), ``edges`` (the jitted sweeps over the targets attributed, compile included), ``prune``
(pruning and scores on the host), each in wall seconds and in the process's CPU seconds (all threads; barely
changed by other processes on a shared machine). Without ``--transcoders``, random per-layer
transcoders of width 512 with an affine skip stand in, each layer's threshold set so that 30 latents fire per
token on average (the cost depends on the number of active latents, not on what they mean). The prompt is the
first tokens of ``tests/golden/prose.txt`` after BOS. ``sweep``: one full-depth batch's GFLOP/s against a plain
float32 matmul of the sweep's largest shape timed in the same process (`sweep_rate`): the physical limit the
edges phase runs against.
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import worker_args, write_json
from gemma_scope import attribute, model
from gemma_scope.attribution import backward, replacement
from gemma_scope.attribution import graph as graphs

PROSE = pathlib.Path(__file__).resolve().parent.parent / "tests" / "golden" / "prose.txt"
WIDTH, TARGET_L0 = 512, 30


def random_transcoders(lm: model.LoadedModel, tokens: np.ndarray) -> dict:
    """Per-layer random transcoders (`replacement`'s layout) whose thresholds give ``TARGET_L0`` on ``tokens``."""
    cfg = lm.config
    n, d = cfg.num_layers, cfg.d_model
    k = jax.random.split(jax.random.key(0), 3)
    out = model.forward(lm.params, cfg, jnp.asarray(tokens)[None], capture=replacement._mlp_sites(n))
    x = jnp.stack([out.acts[s][0] for s in replacement._mlp_sites(n) if s.kind == "mlp_in"]).astype(jnp.float32)
    w_enc = jax.random.normal(k[0], (n, d, WIDTH)) / jnp.linalg.norm(x, axis=-1).mean(axis=1)[:, None, None]
    pre = jnp.einsum("ntd,ndf->ntf", x[:, 1:], w_enc).reshape(n, -1)
    threshold = jnp.quantile(pre, 1 - TARGET_L0 / WIDTH, axis=1)
    return {"W_enc": w_enc, "b_enc": jnp.zeros((n, WIDTH)), "threshold": jnp.broadcast_to(threshold[:, None],
                                                                                         (n, WIDTH)),
            "W_dec": jax.random.normal(k[1], (n, WIDTH, d)) * 0.05, "b_dec": jnp.zeros((n, d)),
            "W_skip": jax.random.normal(k[2], (n, d, d)) * 0.01}


def _best_seconds(call, repeats: int = 3) -> float:
    call()  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        best = min(best, time.perf_counter() - start)
    return best


def sweep_rate(lm: model.LoadedModel, tc: dict, prompt, batch_size: int) -> dict:
    """GFLOP/s of one full-depth sweep (a batch of logit-like targets through every block; the blocks' matmuls
    counted: W_skip, W_O and W_V, 2·T·d·(d + N·H + K·H) FLOPs per target and block) against a jitted float32
    matmul at the sweep's largest shape, [B·T, d] @ [d, N·H], in the same process (best of 3 each)."""
    cfg, t = lm.config, prompt.tokens.shape[0]
    wanted, arrays = backward.targets(lm.params, cfg, tc, prompt), backward.held(lm.params, cfg, tc, prompt)
    layer, position = jnp.full(batch_size, cfg.num_layers), jnp.full(batch_size, t - 1)
    direction = wanted.direction[-1:].repeat(batch_size, axis=0)
    seconds = _best_seconds(lambda: backward.rows(cfg, arrays, layer, position, direction))
    d, heads = cfg.d_model, cfg.num_heads * cfg.head_dim
    flops = 2 * batch_size * cfg.num_layers * t * d * (d + heads + cfg.num_kv_heads * cfg.head_dim)
    a, b = jnp.ones((batch_size * t, d)), jnp.ones((d, heads))
    matmul = jax.jit(jnp.matmul)
    peak = 2 * batch_size * t * d * heads / _best_seconds(lambda: matmul(a, b))
    return {"seconds": round(seconds, 3), "gflops": round(flops / seconds / 1e9, 1),
            "matmul_gflops": round(peak / 1e9, 1), "fraction_of_matmul": round(flops / seconds / peak, 3)}


def main() -> None:
    parser = worker_args(__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16, help="prompt length, BOS included")
    parser.add_argument("--transcoders", help="one transcoder per layer (default: random, see the docstring)")
    parser.add_argument("--batch-size", type=int, default=64, help="targets per backward pass")
    parser.add_argument("--max-feature-nodes", type=int, default=7500,
                        help="latents attributed, by influence (the command's default); 0: every active latent")
    args = parser.parse_args()
    lm = model.load("gemma3_270m")
    ids = lm.tokenizer.encode(PROSE.read_text())
    tokens = np.array([lm.tokenizer.bos_id, *ids[:args.tokens - 1]], np.int32)
    tc = (attribute.load_transcoders(args.transcoders, lm.config.num_layers) if args.transcoders
          else random_transcoders(lm, tokens))
    times, cpu = {}, {}

    def timed(name, call):
        wall, used = time.perf_counter(), time.process_time()
        result = call()
        times[name], cpu[name] = time.perf_counter() - wall, time.process_time() - used
        return result

    limit = args.max_feature_nodes or None
    prompt = timed("prepare", lambda: replacement.prepare(lm.params, lm.config, tc, tokens))
    graph = timed("edges", lambda: graphs.attribute(lm.params, lm.config, tc, prompt, args.batch_size, limit))
    scores = timed("prune", lambda: (graphs.prune(graph), graphs.scores(graph))[1])
    write_json(args.out, {"tokens": len(tokens), "active_latents": graph.num_active,
                          "attributed": len(graph.active), "max_feature_nodes": args.max_feature_nodes,
                          "sweep": sweep_rate(lm, tc, prompt, args.batch_size),
                          "nodes": graph.adjacency.shape[0], "logits": len(graph.logit_tokens),
                          "transcoders": args.transcoders or f"random, width {WIDTH}, L0 {TARGET_L0}, skip",
                          "batch_size": args.batch_size, "seconds": {k: round(v, 2) for k, v in times.items()},
                          "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
                          "total_s": round(times["prepare"] + times["edges"] + times["prune"], 2),
                          "total_cpu_s": round(cpu["prepare"] + cpu["edges"] + cpu["prune"], 2),
                          "replacement_score": scores[0], "completeness_score": scores[1]})


if __name__ == "__main__":
    main()
