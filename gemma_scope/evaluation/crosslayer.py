"""Delta LM loss and reconstruction metrics of a cross-layer transcoder (CLT) or a crosscoder spliced into the LM
(``gemma_scope.sae.crosslayer``'s params, folded, on raw activations). Masked means over real content targets,
BOS/EOS/padding excluded and left at their own activations, as ``splice`` does for SAEs and transcoders.

**CLT**, covered layers ``l_0 < … < l_{n−1}``:

- *replacement model* (all covered layers): ONE forward pass in which every covered ``mlp.l_j`` is replaced by
  the CLT's prediction ``ŷ_j = Σ_{i ≤ j} f_i @ W_dec[i, :, j] + b_dec[j] (+ x_j @ W_skip[j])``, where
  ``f_i = JumpReLU(x_i @ W_enc[i] + b_enc[i])`` is encoded from ``x_i = mlp_in.l_i`` OF THAT SAME PASS (the
  replacement model's own MLP inputs: the hooks run layer by layer, so the latents of layer i are kept for the
  layers j ≥ i). Zero ablation sets every covered ``mlp.l_j`` to zero.
- *each layer alone*: only ``mlp.l_j`` is replaced, by the same ``ŷ_j`` from the pass's (still clean) ``mlp_in``
  of the layers ≤ j; zero ablation of ``mlp.l_j`` alone.

**Crosscoder**, layers ``l_0 < … < l_{n−1}`` of the residual stream: the latents need every layer's residual, so
they are encoded from the CLEAN residuals ``res.l_i`` (the clean pass), ``x̂ = crosscoder_predict(clean)``; then
*each layer alone* replaces ``res.l_j`` by ``x̂_j`` and *all together* replaces every ``res.l_j`` by its ``x̂_j`` in
one pass. A residual stream overwritten at ``l_{n−1}`` screens off the earlier replacements at the content
positions, so "all together" differs from "the last layer alone" only through the non-content positions that
attend to replaced ones (e.g. EOS/BOS inside packed sequences). Zero ablation zeroes the replaced residuals.

FVU, MSE and L0 are those of the dictionary on the CLEAN activations of the same batches (as training measures
them, and as ``splice`` does for transcoders): per covered layer (``fvu_by_layer``; ``l0_by_layer``: a CLT's
latents of each source layer) and pooled (``fvu`` = Σ_j MSE_j / Σ_j Var_j; a CLT's ``l0`` = Σ_i L0_i, its latents
active per token over all layers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemma_scope import model
from gemma_scope.evaluation.splice import CleanPasses
from gemma_scope.sae import crosslayer
from gemma_scope.sites import Site


@functools.partial(jax.jit, static_argnames=("cfg", "layers", "replaced", "zero"))
def clt_pass(params_lm, cfg, tokens: jax.Array, mask: jax.Array, clt: dict, layers: tuple[int, ...],
             replaced: tuple[int, ...], zero: bool = False) -> jax.Array:
    """Per-token NLL ``[B, T−1]`` with ``mlp.layers[j]`` for each index j in ``replaced`` set, at the content
    positions (``mask``), to the CLT's prediction from the same pass's ``mlp_in`` (module docstring), or to zeros
    when ``zero``."""
    splice, xs, fs = mask[..., None], {}, {}

    def read(i):
        def hook(act):
            xs[i] = act.reshape(-1, act.shape[-1]).astype(jnp.float32)
            return act

        return hook

    def latents(i):  # [B·T, F], computed once per pass and kept for every later target layer
        if i not in fs:
            one = {k: clt[k][i : i + 1] for k in ("W_enc", "b_enc", "threshold")}
            fs[i] = crosslayer.clt_encode(one, xs[i][None])[0]
        return fs[i]

    def replace(j):
        def hook(act):
            if zero:
                return jnp.where(splice, jnp.zeros_like(act), act)
            y = sum(latents(i) @ clt["W_dec"][i, :, j] for i in range(j + 1)) + clt["b_dec"][j]
            if "W_skip" in clt:
                y = y + xs[j] @ clt["W_skip"][j]
            return jnp.where(splice, y.reshape(act.shape).astype(act.dtype), act)

        return hook

    hooks = {} if zero else {Site("mlp_in", layers[i]): read(i) for i in range(max(replaced) + 1)}
    hooks |= {Site("mlp", layers[j]): replace(j) for j in replaced}
    return model.token_nll(params_lm, cfg, tokens, replace=hooks)


@functools.partial(jax.jit, static_argnames=("cfg", "sites"))
def set_pass(params_lm, cfg, tokens: jax.Array, mask: jax.Array, sites: tuple[Site, ...],
             values: jax.Array | None) -> jax.Array:
    """Per-token NLL ``[B, T−1]`` with each ``sites[k]`` set to ``values[k] [B, T, d]`` (zeros when ``values`` is
    None) at the content positions."""
    splice = mask[..., None]

    def setter(k):
        def hook(act):
            new = jnp.zeros_like(act) if values is None else values[k].astype(act.dtype)
            return jnp.where(splice, new, act)

        return hook

    return model.token_nll(params_lm, cfg, tokens, replace={site: setter(k) for k, site in enumerate(sites)})


@functools.partial(jax.jit, static_argnames=("kind",))
def _predict_and_sums(params: dict, x: jax.Array, y: jax.Array, weight: jax.Array, shift: jax.Array, kind: str):
    """The dictionary on clean ``x [n, N, d]`` against ``y [n, N, d]``: its prediction ``[n, N, d]`` and the
    weighted sums the metrics are ratios of (per layer ``sq_err``, ``centred``, ``centred_sq``; per latent group
    ``active`` and ``fires``; ``token_sq_err [n, N]``)."""
    if kind == "clt":
        f = crosslayer.clt_encode(params, x)
        pred = crosslayer.clt_decode(params, f)
        if "W_skip" in params:
            pred = pred + jnp.einsum("jbd,jde->jbe", x, params["W_skip"])
    else:
        f = crosslayer.crosscoder_encode(params, x)[None]
        pred = crosslayer.crosscoder_decode(params, f[0])
    active = (f > 0).astype(jnp.float32)
    token_sq_err = jnp.sum((y - pred) ** 2, axis=-1)
    centred = y - shift[:, None, :]
    return pred, {"n": weight.sum(), "sq_err": token_sq_err @ weight,
                  "centred": jnp.einsum("nbd,b->nd", centred, weight),
                  "centred_sq": jnp.sum(centred**2, axis=-1) @ weight, "active": active.sum(-1) @ weight,
                  "fires": jnp.einsum("mbf,b->mf", active, weight), "token_sq_err": token_sq_err}


def evaluate_crosslayer(params_lm, cfg, tokens: np.ndarray, mask: np.ndarray, params: dict, layers: list[int],
                        kind: str, *, per_layer: bool = True, batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Delta LM loss and reconstruction metrics of a CLT or crosscoder (module docstring) on the same sequences.

    Args:
      params_lm, cfg: the LM (``model.load(...)``).
      tokens: int32 ``[N, T]``, each sequence starting with BOS; mask: bool ``[N, T]``, True at content tokens.
      params: folded params in ``crosslayer``'s layout (``kind`` "clt" or "crosscoder"); d = ``cfg.d_model``.
      layers: the covered model layers, increasing.
      per_layer: also splice each covered layer alone (n more spliced and n more zero-ablation passes per batch).
      batch_size: sequences per jitted call.

    Returns:
      Records, first the whole dictionary (``replaced`` = all covered layers), then one per covered layer
      (``replaced`` = [l]) if ``per_layer``; each with ``splice.evaluate_grid``'s keys (``clean_loss``,
      ``spliced_loss``, ``zero_ablation_loss``, ``delta_lm_loss``, ``loss_recovered``, ``n_targets``, ``l0``,
      ``fvu``, ``mse``, ``n_tokens``, ``by_position``; ``dead_fraction`` and ``frequencies`` over all latents in
      the first) plus ``layers``, ``replaced``, ``by_sequence`` (float64 ``[N]`` sums over each sequence's content
      targets: ``clean_nll``, ``spliced_nll``, ``zero_nll``, ``n_targets``; for standard errors over sequences),
      ``fvu_by_layer``, ``l0_by_layer`` (first record). A per-layer record's ``fvu``/``mse`` are of that layer and
      its ``l0`` counts the latents that write to it (a CLT: of the layers ≤ it; a crosscoder: all).

    Raises:
      ValueError: an unknown kind, layers outside the model or not increasing, or params whose d or layer count
        do not fit.
    """
    return evaluate_crosslayers(params_lm, cfg, tokens, mask, [params], layers, kind, per_layer=per_layer,
                                batch_size=batch_size, progress=progress)[0]


def evaluate_crosslayers(params_lm, cfg, tokens: np.ndarray, mask: np.ndarray, dictionaries: list[dict],
                         layers: list[int], kind: str, *, per_layer: bool = True, batch_size: int = 8,
                         progress: bool = True) -> list[list[dict]]:
    """``evaluate_crosslayer`` of several dictionaries of one kind over the same layers (e.g. a CLT against the
    per-layer transcoders it generalises, as a CLT with only diagonal decoders ``W_dec[i, :, i]``), on the same
    sequences, sharing the clean and zero-ablation passes: per batch 2 + D passes instead of 3·D for the whole
    dictionaries. Returns one record list per dictionary, as ``evaluate_crosslayer``'s. Raises as it."""
    if kind not in ("clt", "crosscoder"):
        raise ValueError(f"kind is {kind!r}; expected 'clt' or 'crosscoder'")
    layers = tuple(int(x) for x in layers)
    if any(b <= a for a, b in zip(layers, layers[1:])) or not 0 <= layers[0] <= layers[-1] < cfg.num_layers:
        raise ValueError(f"layers {list(layers)} must increase within the model's 0..{cfg.num_layers - 1}")
    dictionaries = [jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p) for p in dictionaries]
    n, d = len(layers), cfg.d_model
    for params in dictionaries:
        if params["W_enc"].shape[:2] != (n, d):
            raise ValueError(f"{kind} W_enc {params['W_enc'].shape}; expected [{n}, {d}, F] for layers "
                             f"{list(layers)} of {cfg.name}")
    ins, outs = ((tuple(Site("mlp_in", x) for x in layers), tuple(Site("mlp", x) for x in layers)) if kind == "clt"
                 else ((res := tuple(Site("res", x) for x in layers)), res))
    mask = np.asarray(mask, bool)
    num, length = mask.shape
    groups = [tuple(range(n))] + ([(j,) for j in range(n)] if per_layer else [])
    batches = CleanPasses(params_lm, cfg, tokens, mask, batch_size, tuple(sorted(set(ins + outs))),
                          len(groups) * (1 + len(dictionaries)), f"{kind} delta LM loss", progress)
    masked = batches.masked
    # NLL sums [sequence, position], kept per sequence for standard errors; summed over sequences for the means.
    nll_shape = batches.clean.shape
    spliced = [[np.zeros(nll_shape) for _ in groups] for _ in dictionaries]
    zero, shift = [np.zeros(nll_shape) for _ in groups], None
    sq_err, sums = [np.zeros((n, length)) for _ in dictionaries], [{} for _ in dictionaries]
    for rows, batch_tokens, batch_mask, acts in batches:
        x = jnp.stack([acts[s].reshape(-1, d) for s in ins]).astype(jnp.float32)
        y = jnp.stack([acts[s].reshape(-1, d) for s in outs]).astype(jnp.float32)
        weight = batch_mask.reshape(-1).astype(np.float32)
        if shift is None:  # shifted-data variance (as reconstruction.Totals): near the mean, no cancellation
            shift = np.einsum("nbd,b->nd", np.asarray(y, np.float64), weight) / max(weight.sum(), 1)
        for g, group in enumerate(groups):
            if kind == "clt":
                zero[g][rows] = masked(clt_pass(params_lm, cfg, batch_tokens, batch_mask, dictionaries[0], layers,
                                                group, True))
            else:
                zero[g][rows] = masked(set_pass(params_lm, cfg, batch_tokens, batch_mask,
                                                tuple(outs[j] for j in group), None))
        for k, params in enumerate(dictionaries):
            pred, batch_sums = jax.device_get(_predict_and_sums(params, x, y, weight, shift.astype(np.float32), kind))
            token_sq_err = batch_sums.pop("token_sq_err").reshape(n, *batch_mask.shape)
            sq_err[k] += np.where(batch_mask[None], token_sq_err, 0).sum(1)
            for key, value in batch_sums.items():
                sums[k][key] = sums[k].get(key, 0.0) + np.asarray(value, np.float64)
            for g, group in enumerate(groups):
                if kind == "clt":
                    nll = clt_pass(params_lm, cfg, batch_tokens, batch_mask, params, layers, group)
                else:
                    values = pred[list(group)].reshape(len(group), *batch_mask.shape, d)
                    nll = set_pass(params_lm, cfg, batch_tokens, batch_mask, tuple(outs[j] for j in group), values)
                spliced[k][g][rows] = masked(nll)
    target, clean = batches.target, batches.clean
    if not target.any() or sums[0]["n"] == 0:
        raise ValueError("no content targets: mask is False everywhere after the first position")
    return [_records(sums[k], sq_err[k], clean[:num], target, [s[:num] for s in spliced[k]], [z[:num] for z in zero],
                     groups, layers, kind, mask.sum(axis=0)) for k in range(len(dictionaries))]


def _records(sums, sq_err, clean, target, spliced, zero, groups, layers, kind, tokens_at) -> list[dict]:
    """The records of one dictionary from its sums; ``clean``, ``spliced[g]``, ``zero[g]``: masked NLL
    ``[N, T−1]``; ``target``: bool ``[N, T−1]``."""
    n_tok, targets, n_targets = sums["n"], target.sum(axis=0), float(target.sum())
    mse = sums["sq_err"] / n_tok
    var = sums["centred_sq"] / n_tok - np.sum((sums["centred"] / n_tok) ** 2, axis=-1)
    l0 = sums["active"] / n_tok  # [n] source layers (CLT) or [1] (crosscoder)
    frequencies = (sums["fires"] / n_tok).reshape(-1)
    clean_loss = float(clean.sum() / n_targets)
    records = []
    for g, group in enumerate(groups):
        idx = list(group)
        spliced_loss, zero_loss = float(spliced[g].sum() / n_targets), float(zero[g].sum() / n_targets)
        group_l0 = float(l0.sum()) if (kind == "crosscoder" or g == 0) else float(l0[: group[0] + 1].sum())
        group_var = float(var[idx].sum())
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN where nothing counts
            by_position = {"delta_lm_loss": (spliced[g] - clean).sum(0) / targets, "clean_loss": clean.sum(0) / targets,
                           "mse": sq_err[idx].sum(0) / tokens_at, "fvu": sq_err[idx].sum(0) / tokens_at / group_var,
                           "n_tokens": tokens_at.astype(np.float64)}
        by_sequence = {"clean_nll": clean.sum(1), "spliced_nll": spliced[g].sum(1), "zero_nll": zero[g].sum(1),
                       "n_targets": target.sum(1).astype(np.float64)}
        record = {"layers": list(layers), "replaced": [layers[j] for j in group], "l0": group_l0,
                  "fvu": float(mse[idx].sum() / group_var), "mse": float(mse[idx].sum()), "n_tokens": int(round(n_tok)),
                  "clean_loss": clean_loss, "spliced_loss": spliced_loss, "zero_ablation_loss": zero_loss,
                  "delta_lm_loss": spliced_loss - clean_loss,
                  "loss_recovered": float(np.float64(zero_loss - spliced_loss) / (zero_loss - clean_loss)),
                  "n_targets": int(n_targets), "by_position": by_position, "by_sequence": by_sequence}
        if g == 0:
            record |= {"fvu_by_layer": (mse / var).tolist(), "l0_by_layer": l0.tolist(),
                       "dead_fraction": float(np.mean(frequencies == 0)), "frequencies": frequencies.astype(np.float32)}
        records.append(record)
    return records
