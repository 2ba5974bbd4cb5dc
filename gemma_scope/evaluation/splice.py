"""Delta LM loss (Gemma Scope §4.2): next-token cross-entropy with an SAE's reconstruction (a transcoder's
prediction) spliced in at its site, minus the clean one, with the site metrics (``reconstruction``) of the same
forward passes and the loss by position. Masked means over real content targets (BOS/EOS/pad excluded). Params are
folded (release convention) on raw activations (``sae.predict``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from gemma_scope import model, sae
from gemma_scope.evaluation.reconstruction import Totals
from gemma_scope.sites import Site, transcoder_pair


@functools.partial(jax.jit, static_argnames=("cfg", "sites"))
def _clean_pass(params_lm, cfg, tokens: jax.Array, sites: tuple[Site, ...]):
    """Clean per-token NLL ``[B, T−1]`` and the clean activations ``{site: [B, T, w]}`` from ONE forward pass."""
    acts = {}

    def read(site):
        def keep(act):  # an identity replacement: records the activation, changes nothing downstream
            acts[site] = act
            return act

        return keep

    nll = model.token_nll(params_lm, cfg, tokens, replace={site: read(site) for site in sites})
    return nll, acts


class CleanPasses:
    """Sequences in batches, each with its clean pass: iterating yields ``(rows, tokens int32 [B, T], mask bool
    [B, T], acts)`` per batch of ``batch_size`` sequences (``rows`` a slice of the padded sequences; the last batch
    is zero-padded and the padding masked out), ``acts`` the clean activations ``{site: [B, T, w]}`` at ``sites``.
    Meanwhile ``clean`` (float64 ``[N_padded, T−1]``) holds each sequence's clean NLL (nats) at content targets, 0
    elsewhere; ``target`` (bool ``[N, T−1]``) says which targets count; ``masked(nll)`` is a ``[B, T−1]`` NLL of
    the current batch at its content targets (float64), 0 elsewhere, and ticks the progress bar (``passes`` such
    per batch, plus the clean one)."""

    def __init__(self, params_lm, cfg, tokens: np.ndarray, mask: np.ndarray, batch_size: int,
                 sites: tuple[Site, ...], passes: int, desc: str, progress: bool):
        num, length = tokens.shape
        padded = -(-num // batch_size) * batch_size
        self._tokens = np.pad(np.asarray(tokens, np.int32), ((0, padded - num), (0, 0)))
        self._mask = np.pad(np.asarray(mask, bool), ((0, padded - num), (0, 0)))
        self._lm, self._batch_size, self._sites = (params_lm, cfg), batch_size, sites
        self.clean, self.target, self._target = np.zeros((padded, length - 1)), self._mask[:num, 1:], None
        self._bar = tqdm.tqdm(total=padded // batch_size * (1 + passes), unit="pass", desc=desc, disable=not progress)

    def masked(self, nll) -> np.ndarray:
        self._bar.update()
        return np.where(self._target, np.asarray(jax.device_get(nll), np.float64), 0.0)

    def __iter__(self):
        for start in range(0, len(self._tokens), self._batch_size):
            rows = slice(start, start + self._batch_size)
            tokens, mask = self._tokens[rows], self._mask[rows]
            self._target = mask[:, 1:]
            nll, acts = _clean_pass(*self._lm, tokens, self._sites)
            self.clean[rows] = self.masked(nll)
            yield rows, tokens, mask, acts
        self._bar.close()


@functools.partial(jax.jit, static_argnames=("cfg", "site", "site_in"))
def spliced_pass(params_lm, cfg, tokens: jax.Array, mask: jax.Array, site: Site, sae_params: dict | None,
                  site_in: Site | None = None):
    """Per-token NLL ``[B, T−1]`` with the site's content positions (``mask``) replaced by the SAE's (or
    transcoder's) prediction from ``site_in`` (default ``site``) of the same forward pass, or by zeros when
    ``sae_params`` is None (zero ablation). BOS, EOS and padding keep their clean activations, since the SAE was
    trained without them (§3). ``site_in`` must come before ``site`` in the forward pass (mlp_in.L before mlp.L)."""
    splice = mask[..., None]
    inputs = {}

    def read(act):  # runs before ``replace`` when the model reaches site_in
        inputs["x"] = act
        return act

    def replace(act):
        new = jnp.zeros_like(act) if sae_params is None else sae.predict(sae_params, inputs.get("x", act))
        return jnp.where(splice, new.astype(act.dtype), act)

    hooks = {site: replace} if site_in in (None, site) else {site_in: read, site: replace}
    return model.token_nll(params_lm, cfg, tokens, replace=hooks)


def evaluate_grid(
    params_lm,
    cfg,
    tokens: np.ndarray,
    mask: np.ndarray,
    saes: list[tuple[Site, dict] | tuple[Site, dict, Site]],
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict]:
    """Delta LM loss (Gemma Scope §4.1) and reconstruction metrics of many SAEs and transcoders on the same
    sequences.

    Per batch of sequences: one clean pass (which also reads every site), one zero-ablation pass per spliced site,
    one spliced pass per SAE — so a λ sweep or a grid over layers costs 1 + sites + SAEs passes, not 3 per SAE. A
    target ``tokens[b, t+1]`` counts when ``mask[b, t+1]`` (a real content token). The paper's protocol is 2,048
    sequences × 1,024 tokens. A transcoder ``(mlp_in.L, params, mlp.L)`` replaces ``mlp.L`` by its prediction from
    ``mlp_in.L`` of the same pass; its zero ablation is that of ``mlp.L``.

    Args:
      params_lm: the LM's params (``model.load(...).params``).
      cfg: its ``model`` config (static).
      tokens: int32 ``[N, T]``, each sequence starting with BOS.
      mask: bool ``[N, T]``, True exactly at real content tokens.
      saes: ``(site, folded SAE params)`` pairs, or ``(site read, folded transcoder params, site predicted)``
        triples; input and output widths must equal the sites' ``cfg.site_width``.
      batch_size: sequences per jitted call (N is zero-padded to a multiple; padding is masked out).
      progress: show a tqdm bar.

    Returns:
      One dict per SAE, in order: floats ``clean_loss``, ``spliced_loss``, ``zero_ablation_loss`` (masked mean
      nats/token), ``delta_lm_loss`` (= spliced − clean), ``loss_recovered`` ((zero − spliced) / (zero − clean)),
      ``n_targets``; the ``activation_metrics`` keys (``l0``, ``fvu``, ``mse``, ``dead_fraction``, ``n_tokens``,
      ``frequencies``) over the content tokens at the site (the predicted site for a transcoder); and ``by_position``: float arrays indexed by token
      position t (where the site is read and the next token predicted) — ``delta_lm_loss [T−1]``,
      ``clean_loss [T−1]``, ``mse [T]``, ``fvu [T]`` (MSE at t / the site's overall variance), ``n_tokens [T]``;
      NaN where no token counts.

    Raises:
      ValueError: mismatched shapes, no SAE, an SAE whose sites or widths do not fit the model, or a transcoder whose
        input site does not precede its output site in the same layer.
    """
    tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, bool)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} must both be [sequences, length]")
    if not saes:
        raise ValueError("evaluate_grid needs at least one (site, SAE params) pair")
    saes = [(entry[0], jax.tree.map(jnp.asarray, entry[1]), entry[2] if len(entry) > 2 else entry[0])
            for entry in saes]
    for site, params, site_out in saes:
        cfg.check_site(site, params["W_enc"].shape[0], "SAE input")
        cfg.check_site(site_out, params["W_dec"].shape[1], "SAE output")
        if site != site_out and (site, site_out) != transcoder_pair(site.layer):
            raise ValueError(f"a transcoder splices mlp.L from mlp_in.L of the same layer; got {site} -> {site_out}")
    sites = tuple(sorted({s for site, _, site_out in saes for s in (site, site_out)}))
    spliced_sites = sorted({site_out for _, _, site_out in saes})
    length = tokens.shape[1]
    zero_sum = {site: np.zeros(length - 1) for site in spliced_sites}
    spliced_sum = [np.zeros(length - 1) for _ in saes]
    totals, sq_err = [Totals() for _ in saes], [np.zeros(length) for _ in saes]
    batches = CleanPasses(params_lm, cfg, tokens, mask, batch_size, sites, len(spliced_sites) + len(saes),
                          "delta LM loss", progress)
    clean_sum = np.zeros(length - 1)
    for rows, batch_tokens, batch_mask, acts in batches:
        clean_sum += batches.clean[rows].sum(axis=0)  # summed as the spliced passes are: equal passes, equal sums
        for site in spliced_sites:
            zero_sum[site] += batches.masked(spliced_pass(params_lm, cfg, batch_tokens, batch_mask, site,
                                                          None)).sum(axis=0)
        for i, (site, params, site_out) in enumerate(saes):
            spliced_sum[i] += batches.masked(spliced_pass(params_lm, cfg, batch_tokens, batch_mask, site_out, params,
                                                          site)).sum(axis=0)
            d_in, d_out = params["W_enc"].shape[0], params["W_dec"].shape[1]
            token_err = totals[i].add(params, acts[site].reshape(-1, d_in), batch_mask.reshape(-1).astype(np.float32),
                                      acts[site_out].reshape(-1, d_out))
            sq_err[i] += np.where(batch_mask, token_err.reshape(batch_mask.shape), 0.0).sum(axis=0)
    targets = batches.target.sum(axis=0)
    if targets.sum() == 0:
        raise ValueError("no content targets: mask is False everywhere after the first position")
    clean = float(clean_sum.sum() / targets.sum())
    tokens_at = mask.sum(axis=0).astype(np.float64)
    results = []
    for i, (_, _, site_out) in enumerate(saes):
        spliced, zero = float(spliced_sum[i].sum() / targets.sum()), float(zero_sum[site_out].sum() / targets.sum())
        result = totals[i].metrics()
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN where nothing counts
            result["by_position"] = {
                "delta_lm_loss": (spliced_sum[i] - clean_sum) / targets,
                "clean_loss": clean_sum / targets,
                "mse": sq_err[i] / tokens_at,
                "fvu": sq_err[i] / tokens_at / totals[i].variance(),
                "n_tokens": tokens_at,
            }
        result.update(clean_loss=clean, spliced_loss=spliced, zero_ablation_loss=zero, delta_lm_loss=spliced - clean,
                      loss_recovered=float(np.float64(zero - spliced) / (zero - clean)), n_targets=int(targets.sum()))
        results.append(result)
    return results


def delta_lm_loss(params_lm, cfg, tokens: np.ndarray, mask: np.ndarray, site: Site, sae_params: dict,
                  batch_size: int = 8, progress: bool = True) -> dict:
    """Delta LM loss of one SAE spliced in at ``site``: ``evaluate_grid`` of that single SAE (same arguments,
    same result keys, same errors)."""
    return evaluate_grid(params_lm, cfg, tokens, mask, [(site, sae_params)], batch_size, progress)[0]
