"""Release SAEs the way Gemma Scope does, and read them back (arXiv 2408.05147, release on Hugging Face).

Layout: ``<root>/<kind>/layer_<L>/width_<W>/average_l0_<K>/params.npz`` with float32 arrays ``W_enc [d, M]``,
``W_dec [M, d]``, ``b_enc [M]``, ``b_dec [d]``, ``threshold [M]``, normalisation and pre-encoder bias folded in,
so that on raw activations ``pre = x @ W_enc + b_enc; f = (pre > threshold) * relu(pre); x_hat = f @ W_dec + b_dec``.
Next to it the same SAE in SAELens' format (``cfg.json`` + ``sae_weights.safetensors``, architecture "jumprelu",
SAELens >= 6 config with a ``metadata`` block), so it loads with ``SAE.load_from_disk(dir)``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np
import safetensors.numpy

from gemma_scope import sites
from gemma_scope.files import atomic_path
from gemma_scope.sae import PARAM_KEYS
from gemma_scope.sites import Site

PARAMS_FILE = "params.npz"
SAELENS_CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
# The SAELens version whose config layout cfg.json follows (model_name, hook_name, ... under "metadata").
SAELENS_FORMAT_VERSION = "6.0.0"
# TransformerLens hook names SAELens uses for Gemma Scope's three sites.
_HOOK_NAMES = {"res": "blocks.{}.hook_resid_post", "att": "blocks.{}.attn.hook_z", "mlp": "blocks.{}.hook_mlp_out"}


def width_label(width: int) -> str:
    """Gemma Scope's name for an SAE width M: ``2**14 -> "16k"``, ``2**16 -> "65k"``, ``2**20 -> "1m"``.

    Widths ``1024 * 2**k`` are named by thousands (millions from 2**20), rounded down, as in the release's
    ``width_16k ... width_524k, width_1m``; any other width is written in full (``1536 -> "1536"``).

    Raises:
      ValueError: width not a positive integer.
    """
    if not isinstance(width, (int, np.integer)) or width <= 0:
        raise ValueError(f"SAE width must be a positive integer, got {width!r}")
    width = int(width)
    multiple, remainder = divmod(width, 1024)
    if remainder or multiple & (multiple - 1):
        return str(width)
    return f"{width // 1_000_000}m" if width >= 2**20 else f"{width // 1000}k"


def sae_dir(root: str | os.PathLike, site: Site | None, width: int, average_l0: float) -> pathlib.Path:
    """The release directory ``<root>/<kind>/layer_<L>/width_<W>/average_l0_<K>`` (K = round(average_l0)).

    ``site=None`` gives ``<root>/custom/layer_0/...`` (``sites.CUSTOM``) for SAEs not tied to a model site.

    Raises:
      ValueError: average_l0 negative or not finite.
    """
    if not (math.isfinite(average_l0) and average_l0 >= 0):
        raise ValueError(f"average_l0 must be a finite number >= 0, got {average_l0!r}")
    kind, layer = (sites.CUSTOM, 0) if site is None else (site.kind, site.layer)
    return pathlib.Path(root) / kind / f"layer_{layer}" / f"width_{width_label(width)}" / f"average_l0_{round(average_l0)}"


def write_sae(
    root: str | os.PathLike,
    site: Site | None,
    params: dict[str, np.ndarray],
    average_l0: float,
    metadata: dict | None = None,
) -> pathlib.Path:
    """Writes one SAE in the Gemma Scope layout and in SAELens' format; returns the ``params.npz`` path.

    Args:
      root: release root directory (created if missing).
      site: the site the SAE reads, or None for ``custom/layer_0``.
      params: folded SAE parameters in raw-activation space (module docstring), arrays of any float dtype;
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
    with atomic_path(out / PARAMS_FILE) as tmp, open(tmp, "wb") as f:
        np.savez(f, **params)
    with atomic_path(out / SAELENS_WEIGHTS_FILE) as tmp:
        safetensors.numpy.save_file(params, tmp)
    cfg = _saelens_cfg(site, d, width, average_l0, metadata or {})
    with atomic_path(out / SAELENS_CFG_FILE) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2))
    return out / PARAMS_FILE


def load_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads and validates an SAE: a Gemma Scope ``params.npz``, a SAELens ``sae_weights.safetensors``, or a
    directory holding either (``params.npz`` preferred).

    Returns the five float32 arrays of the module docstring. A SAELens SAE with ``apply_b_dec_to_input`` true
    is folded into the Gemma Scope convention (``b_enc' = b_enc - b_dec @ W_enc``, arXiv 2408.05147 §3).

    Raises:
      FileNotFoundError: nothing SAE-like at path.
      ValueError: unreadable file, missing key, wrong shape, non-float dtype, non-finite values, negative
        threshold; a ``cfg.json`` beside it that is not JSON, names another architecture than "jumprelu", gives
        a d_in/d_sae other than the weights' or a normalisation other than "none"; the message names the file
        and the key.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        candidates = [path / PARAMS_FILE, path / SAELENS_WEIGHTS_FILE]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path} holds neither {PARAMS_FILE} nor {SAELENS_WEIGHTS_FILE}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"no SAE file at {path}")
    try:
        if path.suffix == ".safetensors":
            raw = safetensors.numpy.load_file(path)
        else:
            with np.load(path, allow_pickle=False) as npz:
                raw = {k: npz[k] for k in npz.files}
    except Exception as e:  # numpy/safetensors raise many types for corrupt files; report them uniformly.
        raise ValueError(f"{path}: cannot read SAE parameters ({type(e).__name__}: {e})") from e
    params = validate_params(raw, source=str(path))
    cfg_path = path.parent / SAELENS_CFG_FILE
    if cfg_path.is_file():
        cfg = _check_saelens_cfg(params, cfg_path)
        if path.suffix == ".safetensors":
            params = _fold_saelens_cfg(params, cfg, cfg_path)
    return params


def find_saes(path: str | pathlib.Path) -> list[pathlib.Path]:
    """SAE files named by a command-line path: a ``params.npz`` / ``sae_weights.safetensors`` file, an SAE
    directory, or a release root (every ``params.npz`` below it, sorted).

    Raises:
      FileNotFoundError: nothing SAE-like at or below path.
    """
    path = pathlib.Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [path / PARAMS_FILE] if (path / PARAMS_FILE).is_file() else []
        found = found or sorted(path.rglob(PARAMS_FILE))
        found = found or ([path / SAELENS_WEIGHTS_FILE] if (path / SAELENS_WEIGHTS_FILE).is_file() else [])
        if found:
            return found
    raise FileNotFoundError(f"no SAE at {path}: expected a params.npz, an SAE directory or a release root")


def sae_info(path: pathlib.Path) -> dict:
    """What a release says about an SAE file: ``site`` (from the ``<kind>/layer_<L>/width_<W>/average_l0_<K>``
    layout or SAELens ``cfg.json`` metadata), ``l0_coefficient`` and ``target_l0`` (from the metadata), None when
    unknown."""
    cfg_path = path.parent / SAELENS_CFG_FILE
    meta = json.loads(cfg_path.read_text()).get("metadata", {}) if cfg_path.is_file() else {}
    site = meta.get("site")
    parts = path.parent.parts
    if site is None and len(parts) >= 4 and parts[-3].startswith("layer_") and parts[-3][6:].isdigit():
        kind = parts[-4]
        site = f"{kind}.{parts[-3][6:]}" if kind in sites.KINDS else None
    return {"site": site, "l0_coefficient": meta.get("l0_coefficient"), "target_l0": meta.get("target_l0")}


def validate_params(params: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Checks an SAE parameter dict and returns its five arrays as float32 (extra keys dropped).

    Expected: ``W_enc [d, M]``, ``W_dec [M, d]``, ``b_enc [M]``, ``b_dec [d]``, ``threshold [M]``, floating
    dtypes, all finite, ``threshold >= 0``.

    Raises:
      ValueError: naming ``source``, the offending key and what was expected.
    """
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise ValueError(f"{source}: missing key(s) {missing}; an SAE needs {list(PARAM_KEYS)} (has {sorted(params)})")
    for key in PARAM_KEYS:
        if not np.issubdtype(params[key].dtype, np.floating):
            raise ValueError(f"{source}: key {key!r} has dtype {params[key].dtype}; expected a float dtype")
    w_enc = params["W_enc"]
    if w_enc.ndim != 2:
        raise ValueError(f"{source}: key 'W_enc' has shape {w_enc.shape}; expected 2-D [d_model, width]")
    d, width = w_enc.shape
    expected = {"W_enc": (d, width), "W_dec": (width, d), "b_enc": (width,), "b_dec": (d,), "threshold": (width,)}
    for key, shape in expected.items():
        if params[key].shape != shape:
            raise ValueError(
                f"{source}: key {key!r} has shape {params[key].shape}; expected {shape} "
                f"(d_model={d}, width={width} from W_enc {w_enc.shape})"
            )
    out = {k: np.asarray(params[k], dtype=np.float32) for k in PARAM_KEYS}
    for key, value in out.items():
        if not np.isfinite(value).all():
            raise ValueError(f"{source}: key {key!r} holds {np.size(value) - np.isfinite(value).sum()} non-finite values")
    if (out["threshold"] < 0).any():
        raise ValueError(f"{source}: key 'threshold' has negative entries (min {out['threshold'].min()}); expected >= 0")
    return out


def _saelens_cfg(site: Site | None, d: int, width: int, average_l0: float, metadata: dict) -> dict:
    """A SAELens >= 6 JumpReLU config; model_name/hook_name also at top level for pre-6 readers."""
    hook_name = metadata.get("hook_name") or (_HOOK_NAMES[site.kind].format(site.layer) if site else sites.CUSTOM)
    meta = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        "model_name": metadata.get("model_name"),
        "hook_head_index": None,
        "prepend_bos": True,
        "site": str(site) if site else None,
        "average_l0": float(average_l0),
        **metadata,
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
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_path}: cannot read the SAELens config ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
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
    if cfg.get("normalize_activations", "none") not in ("none", False):
        raise ValueError(
            f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} cannot be expressed as raw-activation "
            "params; expected 'none' (fold the normalisation first)"
        )
    if cfg.get("apply_b_dec_to_input", False):
        params = dict(params, b_enc=params["b_enc"] - params["b_dec"] @ params["W_enc"])
    return params
