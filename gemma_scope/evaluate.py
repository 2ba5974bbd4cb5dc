"""Evaluate SAEs and transcoders as Gemma Scope does (arXiv 2408.05147 §4, App. C): L0, FVU, delta LM loss, by
position.

All metrics use folded (release-convention) params on raw activations (``gemma_scope.sae.predict``). An SAE
reconstructs the site it reads; a transcoder reads ``mlp_in.L`` and predicts ``mlp.L``, and its FVU, MSE and
splice are of that output (Gemma Scope 2).

- L0, FVU, MSE, firing frequencies: ``reconstruction`` (on cached activations, or on the sites' activations of
  the evaluation's own forward passes).
- Delta LM loss: next-token cross-entropy with the reconstruction spliced in at the site minus the clean one,
  masked means over real content targets (BOS/EOS/pad excluded).

Command line::

    python -m gemma_scope.evaluate --sae=PATH/params.npz --activations=DIR            # one JSON line per SAE
    python -m gemma_scope.evaluate --sae=RELEASE_ROOT --model=gemma3_270m --site=res.6 --out=DIR
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from gemma_scope import cli, model, release, sae
from gemma_scope.files import json_ready
from gemma_scope.reconstruction import Totals, activation_metrics
from gemma_scope.release_params import SKIP_KEY
from gemma_scope.shards import first_rows, open_shards
from gemma_scope.sites import CUSTOM, Site, transcoder_label


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
      ValueError: mismatched shapes, no SAE, an SAE whose widths do not fit its sites, or a transcoder whose
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
        for what, width, at in (("input", params["W_enc"].shape[0], site), ("output", params["W_dec"].shape[1], site_out)):
            if width != cfg.site_width(at.kind):
                raise ValueError(f"SAE {what} width {width} does not match site {at} of {cfg.name} "
                                 f"(width {cfg.site_width(at.kind)})")
        if site != site_out and (site, site_out) != (Site("mlp_in", site.layer), Site("mlp", site.layer)):
            raise ValueError(f"a transcoder splices mlp.L from mlp_in.L of the same layer; got {site} -> {site_out}")
    sites = tuple(sorted({s for site, _, site_out in saes for s in (site, site_out)}))
    spliced_sites = sorted({site_out for _, _, site_out in saes})
    num, length = tokens.shape
    padded = -(-num // batch_size) * batch_size
    tokens = np.pad(tokens, ((0, padded - num), (0, 0)))
    mask = np.pad(mask, ((0, padded - num), (0, 0)))
    clean_sum, zero_sum = np.zeros(length - 1), {site: np.zeros(length - 1) for site in spliced_sites}
    spliced_sum = [np.zeros(length - 1) for _ in saes]
    totals, sq_err = [Totals() for _ in saes], [np.zeros(length) for _ in saes]
    targets = np.zeros(length - 1)
    bar = tqdm.tqdm(total=padded // batch_size * (1 + len(spliced_sites) + len(saes)), unit="pass",
                    desc="delta LM loss", disable=not progress)
    for start in range(0, padded, batch_size):
        batch_tokens, batch_mask = tokens[start : start + batch_size], mask[start : start + batch_size]
        target = batch_mask[:, 1:]

        def masked(nll):
            bar.update()
            return np.where(target, jax.device_get(nll), 0.0).sum(axis=0)

        clean_nll, acts = _clean_pass(params_lm, cfg, batch_tokens, sites)
        clean_sum += masked(clean_nll)
        targets += target.sum(axis=0)
        for site in spliced_sites:
            zero_sum[site] += masked(spliced_pass(params_lm, cfg, batch_tokens, batch_mask, site, None))
        for i, (site, params, site_out) in enumerate(saes):
            spliced_sum[i] += masked(spliced_pass(params_lm, cfg, batch_tokens, batch_mask, site_out, params, site))
            d_in, d_out = params["W_enc"].shape[0], params["W_dec"].shape[1]
            token_err = totals[i].add(params, acts[site].reshape(-1, d_in), batch_mask.reshape(-1).astype(np.float32),
                                      acts[site_out].reshape(-1, d_out))
            sq_err[i] += np.where(batch_mask, token_err.reshape(batch_mask.shape), 0.0).sum(axis=0)
    bar.close()
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


def _load_lm(name: str, model_config: str | None, corpus: str | None, num_sequences: int, seq_len: int, packing: str):
    """The LM (``model.load(name, config=model_config)``) and ``(tokens [N, T], mask [N, T])``: the first N
    sequences of the corpus's held-out split."""
    from gemma_scope.data.reader import SequenceReader

    lm = model.load(name, config=model_config or None)
    reader = SequenceReader(corpus, split="heldout", seq_len=seq_len, packing=packing, tokenizer=lm.tokenizer)
    if num_sequences > reader.sequences_per_epoch:
        print(f"held-out split has only {reader.sequences_per_epoch} sequences of {seq_len} tokens; using them all",
              file=sys.stderr)
        num_sequences = reader.sequences_per_epoch
    rows = [reader.sequence(i) for i in range(num_sequences)]
    return lm, (np.stack([t for t, _ in rows]), np.stack([m for _, m in rows]))


def evaluate_saes(
    sae_paths: list[pathlib.Path],
    *,
    model_name: str | None = None,
    model_config: str | None = None,
    site: str | None = None,
    corpus: str | None = None,
    packing: str = "packed",
    num_sequences: int = 64,
    seq_len: int = 1024,
    lm_batch_size: int = 8,
    activations: str | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    out: str | pathlib.Path | None = None,
    notes: str = "",
) -> list[dict]:
    """Evaluates released SAE and transcoder files, printing one JSON line of metrics per file; returns the records.

    With ``model_name`` (and ``model_config``, the architecture of an orbax checkpoint, as ``model.load``): delta LM
    loss and site metrics of all SAEs together (``evaluate_grid``) on the first ``num_sequences`` held-out sequences
    of the corpus. A transcoder's sites come from its release (``--site`` names an SAE's only); its record's
    ``site`` reads ``"mlp_in.L→mlp.L"``, with ``" +skip"`` for an affine one. With ``activations`` (a directory of
    cached ``.npy`` shards): ``activation_metrics`` on at most ``max_tokens`` of them. With ``out``:
    ``metrics.json``, ``report.md`` and plots there (``notes`` goes under the report's heading).

    Raises:
      ValueError: neither ``model_name`` nor ``activations``; a count out of range; an SAE whose site is unknown
        when splicing; a transcoder with ``activations`` (one directory holds one site); malformed SAE files
        (``release.load_params``) or activations (``open_shards``, NaN/Inf).
    """
    if not (activations or model_name):
        raise ValueError("give activations=DIR (cached activations) and/or model_name=NAME (delta LM loss)")
    for name, value, least in (("max_tokens", max_tokens, 1), ("batch_size", batch_size, 1),
                               ("num_sequences", num_sequences, 1), ("seq_len", seq_len, 2),
                               ("lm_batch_size", lm_batch_size, 1)):
        if value is not None and value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    records, saes = [], []
    for path in sae_paths:
        params = release.load_params(path)
        info = release.sae_info(path)
        if info["site_out"] != info["site"]:  # a transcoder: its sites are in its config, never overridden
            if activations:
                raise ValueError(f"{path}: a transcoder ({info['site']} -> {info['site_out']}) needs activations of "
                                 "both sites; evaluate it with --model instead of --activations")
            sites = (info["site"], info["site_out"])
            label = transcoder_label(Site.parse(info["site"]), SKIP_KEY in params)
        else:
            if model_name and site is None and info["site"] is None:
                raise ValueError(f"{path}: cannot tell which site to splice at; pass --site (e.g. --site=res.6)")
            label = site or info["site"] or CUSTOM
            sites = (label, label)
        records.append({"sae": str(path), "site": label, "width": params["W_enc"].shape[1],
                        "l0_coefficient": info["l0_coefficient"], "target_l0": info["target_l0"]})
        saes.append((Site.parse(sites[0]) if model_name else None, params,
                     Site.parse(sites[1]) if model_name else None))
    if model_name:
        lm, sequences = _load_lm(model_name, model_config, corpus, num_sequences, seq_len, packing)
        for record, result in zip(records, evaluate_grid(lm.params, lm.config, *sequences, saes,
                                                          batch_size=lm_batch_size)):
            record.update(result)
    arrays = open_shards(activations)[0] if activations else None  # opened (and verified) once
    for record, (_, params, _) in zip(records, saes):
        if activations:
            record.update(activation_metrics(params, first_rows(arrays, max_tokens), batch_size=batch_size))
        print(json.dumps(json_ready({k: v for k, v in record.items() if k not in ("frequencies", "by_position")})),
              flush=True)
    if out:
        from gemma_scope import report  # matplotlib only when a report is asked for

        notes = notes or f"Model: {model_name or '–'}; activations: {activations or '–'}."
        print(f"report: {report.write_evaluation(records, out, notes)}", file=sys.stderr)
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    """``python -m gemma_scope.evaluate``: prints one JSON line of metrics per SAE; returns the records."""
    parser = cli.parser("python -m gemma_scope.evaluate", __doc__.split("\n\n")[0])
    parser.add_argument("--sae", action="append", required=True,
                        help="params.npz, SAE directory or release root; repeatable")
    parser.add_argument("--activations", help="directory of cached activation shards (*.npy [tokens, d], see gemma_scope.activations)")
    parser.add_argument("--max_tokens", type=int, help="evaluate on at most this many cached activations")
    parser.add_argument("--batch_size", type=int, help="activations per jitted batch (default: by SAE width)")
    parser.add_argument("--model", help="LM for delta LM loss: a registry name (gemma3_270m), HF dir or orbax path")
    parser.add_argument("--model_config", help="architecture name of an orbax checkpoint whose shapes are ambiguous")
    parser.add_argument("--site", help="site to splice at, e.g. res.6 (default: from the SAE's release path)")
    parser.add_argument("--corpus", help="built corpus directory (default: $GEMMA_SCOPE_CORPUS or ./corpus)")
    parser.add_argument("--packing", default="packed", choices=("packed", "document"),
                        help="held-out sequence layout (gemma_scope.data.reader)")
    parser.add_argument("--num_sequences", type=int, default=64, help="held-out sequences (paper: 2048)")
    parser.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence (paper: 1024)")
    parser.add_argument("--lm_batch_size", type=int, default=8, help="sequences per LM batch")
    parser.add_argument("--out", help="directory for metrics.json, report.md and plots")
    args = parser.parse_args(argv)
    if not (args.activations or args.model):
        parser.error("give --activations=DIR (cached activations) and/or --model=NAME (delta LM loss)")
    sae_paths = [p for spec in args.sae for p in release.find_saes(spec)]
    return evaluate_saes(sae_paths, model_name=args.model, model_config=args.model_config, site=args.site, corpus=args.corpus, packing=args.packing,
                         num_sequences=args.num_sequences, seq_len=args.seq_len, lm_batch_size=args.lm_batch_size,
                         activations=args.activations, max_tokens=args.max_tokens, batch_size=args.batch_size,
                         out=args.out)


if __name__ == "__main__":
    cli.run(main)
