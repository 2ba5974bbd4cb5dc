"""The Gemma Scope 1 release layout of SAEs (arXiv 2408.05147), with a SAELens copy, written and read back. The
arrays are those of ``release.params``; ``release.read`` reads this layout and Gemma Scope 2's (``release.gs2``).

Gemma Scope 1 (SAEs): ``<root>/<kind>/layer_<L>/width_<W>/average_l0_<K>/params.npz`` with the keys of
``release.params``, and next to it the same SAE in SAELens' format (``cfg.json`` + ``sae_weights.safetensors``,
architecture "jumprelu", SAELens >= 6 config with a ``metadata`` block), so it loads with
``SAE.load_from_disk(dir)``.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import safetensors.numpy

from gemma_scope import sites
from gemma_scope.files import atomic_path
from gemma_scope.release.params import (
    check_average_l0,
    peer_model_name,
    read_json,
    read_safetensors,
    validate_params,
    width_label,
)
from gemma_scope.sites import Site

PARAMS_FILE = "params.npz"
SAELENS_CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
# The SAELens version whose config layout cfg.json follows (model_name, hook_name, ... under "metadata").
SAELENS_FORMAT_VERSION = "6.0.0"
# TransformerLens hook names of our sites, as SAELens names Gemma Scope's (res, att, mlp). mlp_in (the
# pre-feed-forward RMSNorm's output) has no exact TransformerLens hook: ln2.hook_normalized is that norm's output
# before its scale (1 + w), so an mlp_in SAE does not read it as it stands.
_HOOK_NAMES = {"res": "blocks.{}.hook_resid_post", "att": "blocks.{}.attn.hook_z", "mlp": "blocks.{}.hook_mlp_out",
               "mlp_in": "blocks.{}.ln2.hook_normalized"}


def sae_dir(root: str | os.PathLike, site: Site | None, width: int, average_l0: float) -> pathlib.Path:
    """The release directory ``<root>/<kind>/layer_<L>/width_<W>/average_l0_<K>`` (K = round(average_l0)).

    ``site=None`` gives ``<root>/custom/layer_0/...`` (``sites.CUSTOM``) for SAEs not tied to a model site.

    Raises:
      ValueError: average_l0 negative or not finite.
    """
    check_average_l0(average_l0)
    kind, layer = (sites.CUSTOM, 0) if site is None else (site.kind, site.layer)
    return pathlib.Path(root) / kind / f"layer_{layer}" / f"width_{width_label(width)}" / f"average_l0_{round(average_l0)}"


def write_sae(
    root: str | os.PathLike,
    site: Site | None,
    params: dict[str, np.ndarray],
    average_l0: float,
    metadata: dict | None = None,
) -> pathlib.Path:
    """Writes one SAE in the Gemma Scope 1 layout and in SAELens' format; returns the ``params.npz`` path.

    Args:
      root: release root directory (created if missing).
      site: the site the SAE reads, or None for ``custom/layer_0``.
      params: folded SAE parameters in raw-activation space (``release.params``), arrays of any float dtype;
        stored as float32.
      average_l0: the SAE's mean L0 on evaluation tokens; names the ``average_l0_<K>`` directory.
      metadata: JSON-serialisable facts stored in ``cfg.json``'s ``metadata`` block (e.g. ``model_name``,
        ``l0_coefficient``, ``training_tokens``); ``hook_name`` defaults to the site's TransformerLens hook.

    Every file is written to a temporary name and renamed into place, so readers never see a partial file.

    Raises:
      ValueError: params fail the checks of ``validate_params``, or a bad average_l0.
    """
    params = validate_params({k: np.asarray(v) for k, v in params.items()}, source="params to write")
    d, width = params["W_enc"].shape
    out = sae_dir(root, site, width, average_l0)
    out.mkdir(parents=True, exist_ok=True)
    nbytes = sum(v.nbytes for v in params.values())  # the arrays; the containers add a few hundred bytes
    with atomic_path(out / PARAMS_FILE, nbytes) as tmp, open(tmp, "wb") as f:
        np.savez(f, **params)
    with atomic_path(out / SAELENS_WEIGHTS_FILE, nbytes) as tmp:
        safetensors.numpy.save_file(params, tmp)
    cfg = json.dumps(_saelens_cfg(site, d, width, average_l0, metadata or {}), indent=2)
    with atomic_path(out / SAELENS_CFG_FILE, len(cfg)) as tmp:
        tmp.write_text(cfg)
    return out / PARAMS_FILE


def load_gs1(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Reads and validates a Gemma Scope 1 ``params.npz`` or a SAELens JumpReLU ``sae_weights.safetensors`` (with
    its ``cfg.json``, if any); the arrays of ``release.params``. A SAELens SAE with ``apply_b_dec_to_input`` true
    is folded into the Gemma Scope convention (``b_enc' = b_enc − b_dec @ W_enc``, arXiv 2408.05147 §3).

    Raises:
      ValueError: as ``release.read.load_params`` says, naming the file and the key.
    """
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                raw = {k: npz[k] for k in npz.files}
        except Exception as e:  # numpy raises many types for corrupt files; report them uniformly.
            raise ValueError(f"{path}: cannot read SAE parameters ({type(e).__name__}: {e})") from e
    else:
        raw = read_safetensors(path)
    params = validate_params(raw, source=str(path))
    cfg_path = path.parent / SAELENS_CFG_FILE
    if cfg_path.is_file():
        cfg = _check_saelens_cfg(params, cfg_path)
        if path.suffix == ".safetensors":
            params = _fold_saelens_cfg(params, cfg, cfg_path)
    return params



def _saelens_cfg(site: Site | None, d: int, width: int, average_l0: float, metadata: dict) -> dict:
    """A SAELens >= 6 JumpReLU config that SAELens (``SAE.load_from_disk``) and SAEBench read as they stand.

    What they read (sae_lens 6.54.12, ``saes/sae.py`` and ``loading/pretrained_sae_loaders.py``): top-level
    ``architecture`` "jumprelu", ``d_in``, ``d_sae``, ``dtype``, ``apply_b_dec_to_input`` (false: our b_enc already
    holds the pre-encoder bias, Gemma Scope's convention), ``normalize_activations`` "none" (our normalisation is
    folded into the weights, so the SAE reads raw activations) and ``reshape_activations``; and under ``metadata``
    the TransformerLens ``model_name`` (``release.params.PEER_MODEL_NAMES``, e.g. "google/gemma-3-270m"), its
    ``hook_name`` (``_HOOK_NAMES``), ``hook_head_index``, ``prepend_bos``, ``context_size``,
    ``model_from_pretrained_kwargs`` and ``exclude_special_tokens``. Ours beside them: ``gemma_scope_model`` (the
    name given), ``site``, ``normalisation_folded``, ``average_l0`` and whatever ``metadata`` holds (its
    ``model_name`` is translated, its ``hook_name`` wins). model_name/hook_name are repeated at top level for pre-6
    readers.
    """
    model = metadata.get("model_name")
    hook_name = metadata.get("hook_name") or (_HOOK_NAMES[site.kind].format(site.layer) if site else sites.CUSTOM)
    meta = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        "model_class_name": "HookedTransformer",
        "model_from_pretrained_kwargs": {},
        "hook_head_index": None,
        "prepend_bos": True,  # every sequence starts with BOS
        "exclude_special_tokens": True,  # BOS, EOS and padding positions never train or evaluate an SAE
        "normalisation_folded": True,
        "site": str(site) if site else None,
        "average_l0": float(average_l0),
        **metadata,
        "gemma_scope_model": model,
        "model_name": peer_model_name(model),
        "hook_name": hook_name,
    }
    return {
        "architecture": "jumprelu",
        "d_in": d,
        "d_sae": width,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        # SAELens flattens TransformerLens' hook_z [heads, head_dim] to our concatenated att site.
        "reshape_activations": "hook_z" if site is not None and site.kind == "att" else "none",
        "model_name": meta["model_name"],
        "hook_name": hook_name,
        "metadata": meta,
    }


def _check_saelens_cfg(params: dict[str, np.ndarray], cfg_path: pathlib.Path) -> dict:
    """The SAELens config beside an SAE file, checked against its weights (the architecture, when given, must be
    "jumprelu"; d_in and d_sae, when given, must be the weights' d and width). Raises ValueError naming the key."""
    cfg = read_json(cfg_path)
    if cfg.get("architecture", "jumprelu") != "jumprelu":
        raise ValueError(f"{cfg_path}: architecture {cfg['architecture']!r}; only 'jumprelu' SAEs can be read "
                         "(their weights hold a threshold)")
    d, width = params["W_enc"].shape
    for key, value in (("d_in", d), ("d_sae", width)):
        if key in cfg and cfg[key] != value:
            raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} disagrees with the weights' {value} (W_enc {[d, width]})")
    return cfg


def _fold_saelens_cfg(params: dict[str, np.ndarray], cfg: dict, cfg_path: pathlib.Path) -> dict[str, np.ndarray]:
    """Applies a SAELens cfg.json so that params follow the Gemma Scope inference convention."""
    if cfg.get("normalize_activations", "none") not in ("none", None, False):
        raise ValueError(
            f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} cannot be expressed as raw-activation "
            "params; expected 'none' (fold the normalisation first)"
        )
    if cfg.get("apply_b_dec_to_input", False):
        params = dict(params, b_enc=params["b_enc"] - params["b_dec"] @ params["W_enc"])
    return params
