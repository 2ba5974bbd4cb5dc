"""k-sparse probing of SAE latents on sae-probes' binary datasets (``evaluation.probe_datasets``), against the
same probes on the raw activations of the SAE's site.

Protocol (sae-probes 0.4.2, the variant a 2026 audit of SAEBench, arXiv 2605.18229, rates most reliable; SAEBench's
k-sparse probing, arXiv 2503.09532 §3):

- the activation of each prompt is the site's activation at its last token (sae-probes'
  ``generate_model_activations``: BOS + prompt, truncated on the left to 1,024 tokens), from one forward pass per
  batch (`last_token_activations`);
- SAE features are the released SAE's latents ``f(x)`` (``sae.encode``, folded params on raw activations);
- the k features are the k largest |difference of class means| on the training split, after dividing each feature
  by its mean |value| over the examples where it is non-zero (`rank_features`, sae-probes' ``get_sorted_indices``
  with ``mean_act_normalization``). The raw top-k baseline ranks the site's dimensions by the same rule;
- the probe is an L2 logistic regression (scikit-learn, lbfgs, ``max_iter`` 1,000, features unscaled) whose C is
  the best of ``logspace(5, −5, 10)`` by AUC on the last min(20%, 100) training examples, then refitted on the
  whole (shuffled) training split (`fit_probe`, sae-probes' ``find_best_reg``); we report test accuracy and AUC.
  Deviation: below 128 training examples sae-probes cross-validates (6 folds); we keep the one hold-out split
  (sae-probes' datasets always have ≥ 686 training examples, so its runs never differ from ours).
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from gemma_scope import model, sae
from gemma_scope.evaluation import probe_datasets
from gemma_scope.sites import Site

DEFAULT_KS = (1, 2, 5, 16)
C_GRID = np.logspace(5, -5, 10)
MAX_ITER = 1000
MIN_BUCKET = 8  # shortest padded sequence: lengths pad to powers of two from here, one compile each


def _sklearn():
    try:
        import sklearn.exceptions
        import sklearn.linear_model
        import sklearn.metrics
    except ImportError:
        raise FileNotFoundError(f"probing needs scikit-learn; run: {probe_datasets.INSTALL_HINT}") from None
    return sklearn


@functools.partial(jax.jit, static_argnames=("cfg", "sites"))
def _last_token_pass(params, cfg, tokens, mask, last, sites):
    out = model.forward(params, cfg, tokens, capture=sites, attention_mask=mask, logits=False)
    rows = jnp.arange(tokens.shape[0])
    return tuple(out.acts[site][rows, last].astype(jnp.float32) for site in sites)


def last_token_activations(params, cfg, tokenizer, prompts: Sequence[str], sites: Sequence[Site], *,
                           max_seq_len: int = probe_datasets.MAX_SEQ_LEN, batch_tokens: int = 1024,
                           progress: bool = True) -> dict[Site, np.ndarray]:
    """The activation at each prompt's last token of every site, from one forward pass per batch.

    Each prompt becomes BOS + its tokens, truncated on the left to ``max_seq_len`` (sae-probes). Prompts are sorted
    by length and padded on the right to the next power of two (≥ 8), ``batch_tokens // T`` rows per batch (whole
    batches: one compile per length), so short prompts cost little.

    Returns:
      {site: float32 [len(prompts), width]}, in the prompts' order.

    Raises:
      ValueError: a site beyond the model's layers (``model.forward``), ``max_seq_len`` < 1.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    sites = tuple(sorted(set(sites)))
    ids = [([tokenizer.bos_id] + list(t))[-max_seq_len:] for t in tokenizer.encode_batch(list(prompts))]
    lengths = np.array([len(t) for t in ids])
    buckets = np.maximum(MIN_BUCKET, 2 ** np.ceil(np.log2(np.maximum(lengths, 1)))).astype(int)
    out = {site: np.zeros((len(ids), cfg.site_width(site.kind)), np.float32) for site in sites}
    bar = tqdm.tqdm(total=len(ids), desc="prompts", unit="prompt", disable=not progress, file=sys.stderr)
    for t in np.unique(buckets):
        rows = max(1, batch_tokens // int(t))
        members = np.where(buckets == t)[0]
        for start in range(0, len(members), rows):
            chunk = members[start:start + rows]
            tokens = np.zeros((rows, t), np.int32)
            tokens[:, 0] = tokenizer.bos_id  # padding rows: BOS alone, so every row attends to something
            for row, i in enumerate(chunk):
                tokens[row, :lengths[i]] = ids[i]
            last = np.zeros(rows, np.int32)
            last[:len(chunk)] = lengths[chunk] - 1
            mask = np.arange(t)[None, :] <= last[:, None]
            acts = _last_token_pass(params, cfg, tokens, mask, last, sites)
            for site, a in zip(sites, acts):
                out[site][chunk] = np.asarray(a)[:len(chunk)]
            bar.update(len(chunk))
    bar.close()
    return out


def rank_features(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Feature indices by decreasing |mean over class 1 − mean over class 0| of ``x / m``, where ``m_j`` is the
    mean |x_j| over the rows where ``x_j ≠ 0`` (sae-probes ``get_sorted_indices`` + ``mean_act_normalization``,
    with its 1e-6 guards).

    Args:
      x: float [N, F] features of the training split. y: int [N] labels in {0, 1}.

    Returns:
      int64 [F]; ties keep the lower index first.
    """
    x = np.asarray(x, np.float64)
    scale = np.abs(x).sum(0) / ((x != 0).sum(0) + 1e-6)
    x = x / (scale + 1e-6)
    diff = x[y == 1].mean(0) - x[y == 0].mean(0)
    return np.argsort(-np.abs(diff), kind="stable")


def _check_classes(y_train: np.ndarray, y_test: np.ndarray) -> None:
    for what, labels in (("training split", y_train), ("test split", y_test)):
        if len(np.unique(labels)) < 2:
            raise ValueError(f"the {what} holds one class only; a probe needs both")


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
              seed: int = probe_datasets.SEED) -> dict[str, float]:
    """sae-probes' ``find_best_reg`` (module docstring): L2 logistic regression, C chosen on a hold-out of the
    training split, refitted on all of it.

    Args:
      x_train, x_test: float [N, F]; y_train, y_test: int [N] in {0, 1}.

    Returns:
      {"accuracy": test accuracy, "auc": test ROC AUC, "C": the chosen C}.

    Raises:
      ValueError: the training split, its hold-out part or the test split holds one class only (no probe can be
        fitted or scored).
    """
    sklearn = _sklearn()
    import threadpoolctl  # a dependency of scikit-learn

    _check_classes(y_train, y_test)
    n = len(x_train)
    val = min(int(0.2 * n), 100)
    fit_part, val_part = slice(0, n - val), slice(n - val, n)
    if val < 1 or len(np.unique(y_train[val_part])) < 2 or len(np.unique(y_train[fit_part])) < 2:
        raise ValueError(f"the hold-out of the last {val} of {n} training examples needs both classes on each side")

    def model_for(c):
        return sklearn.linear_model.LogisticRegression(C=c, random_state=seed, max_iter=MAX_ITER)

    # One BLAS thread: these fits are small, and on a shared CPU threads spin against each other (measured 6-9×
    # slower with 2 threads than 1 under load).
    with warnings.catch_warnings(), threadpoolctl.threadpool_limits(limits=1):
        warnings.simplefilter("ignore", sklearn.exceptions.ConvergenceWarning)  # as sae-probes
        scores = []
        for c in C_GRID:
            probe = model_for(c).fit(x_train[fit_part], y_train[fit_part])
            scores.append(sklearn.metrics.roc_auc_score(y_train[val_part], probe.predict_proba(x_train[val_part])[:, 1]))
        best = float(C_GRID[int(np.argmax(scores))])
        order = np.random.RandomState(seed).permutation(n)
        probe = model_for(best).fit(x_train[order], y_train[order])
    return {"accuracy": float(sklearn.metrics.accuracy_score(y_test, probe.predict(x_test))),
            "auc": float(sklearn.metrics.roc_auc_score(y_test, probe.predict_proba(x_test)[:, 1])), "C": best}


def k_sparse_probes(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                    ks: Sequence[int], seed: int = probe_datasets.SEED) -> dict[str, dict]:
    """For each k, `fit_probe` on the top k features of `rank_features` (k capped at the feature count).

    Returns:
      {str(k): {"accuracy", "auc", "C", "features": the k chosen feature indices}}.

    Raises:
      ValueError: as `fit_probe`.
    """
    _check_classes(y_train, y_test)
    order = rank_features(x_train, y_train)
    result = {}
    for k in ks:
        chosen = order[:k]
        result[str(k)] = dict(fit_probe(x_train[:, chosen], y_train, x_test[:, chosen], y_test, seed),
                              features=chosen.tolist())
    return result


_encode = jax.jit(sae.encode)


def probe_dataset(acts: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray,
                  sae_params: Sequence[dict], ks: Sequence[int], seed: int = probe_datasets.SEED) -> dict:
    """One dataset at one site: the raw baselines (all dimensions, and the top k) and each SAE's k-sparse probes.

    Args:
      acts: float32 [N, d] the site's last-token activations; labels: int [N]; train, test: indices (``split``).
      sae_params: folded params of SAEs reading this site.

    Returns:
      {"baseline": {"all": metrics, str(k): metrics}, "saes": [{str(k): metrics} per SAE]}; a probe that cannot
      be fitted makes that SAE's entry (or the baseline's) {"error": reason}.
    """
    x_train, x_test, y_train, y_test = acts[train], acts[test], labels[train], labels[test]
    try:
        baseline = {"all": fit_probe(x_train, y_train, x_test, y_test, seed),
                    **k_sparse_probes(x_train, y_train, x_test, y_test, ks, seed)}
    except ValueError as e:
        baseline = {"error": str(e)}
    saes = []
    for params in sae_params:
        f_train, f_test = np.asarray(_encode(params, x_train)), np.asarray(_encode(params, x_test))
        try:
            saes.append(k_sparse_probes(f_train, y_train, f_test, y_test, ks, seed))
        except ValueError as e:
            saes.append({"error": str(e)})
    return {"baseline": baseline, "saes": saes}


def mean_metrics(results: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Means of accuracy and AUC over datasets: {key: {"accuracy", "auc"}} for every key (k or "all") of the
    results (entries holding "error" are left out)."""
    results = [r for r in results if "error" not in r]
    keys = list(results[0]) if results else []
    return {key: {m: float(np.mean([r[key][m] for r in results])) for m in ("accuracy", "auc")} for key in keys}
