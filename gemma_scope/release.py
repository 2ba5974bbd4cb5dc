"""Release SAEs and transcoders the way Gemma Scope 1 and 2 do, and read them back (arXiv 2408.05147; Gemma Scope 2,
../shared/research/gemma-scope-2.md). This module owns every release format: it writes and reads each one.

In memory a released SAE or transcoder is a dict of float32 arrays ``W_enc [d_in, M]``, ``W_dec [M, d_out]``,
``b_enc [M]``, ``b_dec [d_out]``, ``threshold [M]`` and, for a transcoder with an affine skip, ``W_skip [d_in,
d_out]``; normalisation and the pre-encoder bias are folded in, so on raw activations
``pre = x @ W_enc + b_enc; f = (pre > threshold) * relu(pre); y_hat = f @ W_dec + b_dec (+ x @ W_skip)``.
An SAE reads and reconstructs one site (``d_out = d_in``); a transcoder reads ``mlp_in.L`` and predicts ``mlp.L``.

Layouts:

- Gemma Scope 1 (SAEs): ``<root>/<kind>/layer_<L>/width_<W>/average_l0_<K>/params.npz`` with the keys above, and
  next to it the same SAE in SAELens' format (``cfg.json`` + ``sae_weights.safetensors``, architecture
  "jumprelu", SAELens >= 6 config with a ``metadata`` block), so it loads with ``SAE.load_from_disk(dir)``.
- Gemma Scope 2 (SAEs and transcoders): ``<root>/<folder>/layer_<L>_width_<W>_l0_<bucket>[_affine]/`` holding
  ``params.safetensors`` (lowercase ``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``, optional
  ``affine_skip_connection [d_in, d_out]``) and ``config.json`` with GS2's keys (``GS2_CONFIG_KEYS``); folders
  ``resid_post_all``, ``attn_out_all``, ``mlp_out_all``, ``transcoder_all``; bucket from the L0 (``l0_bucket``).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re

import numpy as np
import safetensors.numpy

from gemma_scope import sites
from gemma_scope.files import atomic_path
from gemma_scope.sae import PARAM_KEYS
from gemma_scope.sites import Site

PARAMS_FILE = "params.npz"
SAELENS_CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
GS2_PARAMS_FILE = "params.safetensors"
GS2_CONFIG_FILE = "config.json"
SKIP_KEY = "W_skip"  # a transcoder's affine skip connection [d_in, d_out] (Gemma Scope 2)
# Gemma Scope 2's tensor names for ours.
GS2_TENSORS = {"W_enc": "w_enc", "W_dec": "w_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold",
               SKIP_KEY: "affine_skip_connection"}
# The keys of a Gemma Scope 2 config.json, in the order its files have them.
GS2_CONFIG_KEYS = ("hf_hook_point_in", "hf_hook_point_out", "width", "model_name", "architecture", "l0",
                   "affine_connection", "type")
# Hugging Face Gemma module whose output (the input, for att) each site is: GS2's hook points.
HF_HOOK_POINTS = {"res": "model.layers.{}.output", "att": "model.layers.{}.self_attn.o_proj.input",
                  "mlp": "model.layers.{}.post_feedforward_layernorm.output",
                  "mlp_in": "model.layers.{}.pre_feedforward_layernorm.output"}
GS2_FOLDERS = {"res": "resid_post_all", "att": "attn_out_all", "mlp": "mlp_out_all", "transcoder": "transcoder_all"}
# Gemma Scope 2's L0 buckets: the names and the L0 bands they stand for.
L0_BUCKETS = {"small": (10, 20), "medium": (30, 60), "big": (90, 150)}
# The SAELens version whose config layout cfg.json follows (model_name, hook_name, ... under "metadata").
SAELENS_FORMAT_VERSION = "6.0.0"
# TransformerLens hook names SAELens uses for Gemma Scope's sites (mlp_in: its name for a transcoder's input).
_HOOK_NAMES = {"res": "blocks.{}.hook_resid_post", "att": "blocks.{}.attn.hook_z", "mlp": "blocks.{}.hook_mlp_out",
               "mlp_in": "blocks.{}.ln2.hook_normalized"}


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
    _check_average_l0(average_l0)
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


def l0_bucket(average_l0: float) -> str:
    """Gemma Scope 2's L0 bucket for a mean L0: "small" (its band 10–20), "medium" (30–60) or "big" (90–150).

    GS2 names its training targets; we name the achieved L0 (``config.json``'s ``l0`` records it, rounded). An L0
    between two bands goes to the nearer one on a log scale, i.e. the boundaries are the geometric means of the
    facing band edges (√(20·30) ≈ 24.5 and √(60·90) ≈ 73.5); below 10 is "small" and above 150 "big".

    Raises:
      ValueError: average_l0 negative or not finite.
    """
    _check_average_l0(average_l0)
    names = list(L0_BUCKETS)
    for name, above in zip(names, names[1:]):
        if average_l0 < math.sqrt(L0_BUCKETS[name][1] * L0_BUCKETS[above][0]):
            return name
    return names[-1]


def gs2_labels(average_l0s: list[float]) -> list[str]:
    """The ``l0_<label>`` of each of several SAEs of one site and width (a λ or target-L0 sweep) in the Gemma
    Scope 2 layout, which has one directory per bucket: per bucket (``l0_bucket``) the SAE whose L0 is nearest,
    on a log scale, to the geometric centre of the bucket's band gets the bucket's name; any other gets its rounded
    L0 (``"37"``: OUR extension of GS2's names, so that a whole sweep is released; its config.json is GS2's).

    Raises:
      ValueError: an average L0 that is negative or not finite.
    """
    buckets = [l0_bucket(l0) for l0 in average_l0s]
    off = [abs(math.log(max(l0, 1e-9) / math.sqrt(math.prod(L0_BUCKETS[b])))) for l0, b in zip(average_l0s, buckets)]
    nearest = {b: min((i for i in range(len(buckets)) if buckets[i] == b), key=off.__getitem__) for b in set(buckets)}
    return [b if nearest[b] == i else str(round(l0)) for i, (b, l0) in enumerate(zip(buckets, average_l0s))]


def gs2_dir(root: str | os.PathLike, site: Site, width: int, average_l0: float, *, transcoder: bool = False,
            affine: bool = False, l0_label: str | None = None) -> pathlib.Path:
    """The Gemma Scope 2 directory ``<root>/<folder>/layer_<L>_width_<W>_l0_<label>[_affine]`` of an SAE on
    ``site`` (folder by site kind, ``GS2_FOLDERS``) or of a transcoder of layer ``site.layer``; the label is
    ``l0_label`` (``gs2_labels``) or the L0's bucket.

    Raises:
      ValueError: an SAE site kind GS2 has no folder for (``mlp_in``), or a bad average_l0.
    """
    if not transcoder and site.kind not in GS2_FOLDERS:
        raise ValueError(f"Gemma Scope 2 has no layout for SAEs on {site}; expected a site of kind "
                         f"{[k for k in GS2_FOLDERS if k != 'transcoder']}")
    folder = GS2_FOLDERS["transcoder" if transcoder else site.kind]
    label = l0_label or l0_bucket(average_l0)
    name = f"layer_{site.layer}_width_{width_label(width)}_l0_{label}{'_affine' if affine else ''}"
    return pathlib.Path(root) / folder / name


def write_gs2(root: str | os.PathLike, site: Site, params: dict[str, np.ndarray], average_l0: float, *,
              model_name: str, site_out: Site | None = None, l0_label: str | None = None) -> pathlib.Path:
    """Writes an SAE or transcoder in the Gemma Scope 2 layout (module docstring); returns the params file path.

    Args:
      root: release root directory (created if missing).
      site: the site it reads.
      params: folded params in raw-activation space (module docstring), any float dtype; stored as float32.
        ``W_skip`` present makes the ``_affine`` variant (``affine_skip_connection``).
      average_l0: mean L0 on evaluation tokens; gives the bucket (``l0_bucket``) and config.json's ``l0``.
      model_name: config.json's ``model_name`` (GS2 writes the Hugging Face id, e.g. "google/gemma-3-270m-pt").
      site_out: the site it predicts: None or ``site`` for an SAE; ``mlp.L`` for a transcoder reading ``mlp_in.L``.
      l0_label: the directory's ``l0_`` label (``gs2_labels``, for a sweep); default the L0's bucket.

    Raises:
      ValueError: params failing ``validate_params``; sites GS2 has no layout for; a bad average_l0.
    """
    site_out = site_out or site
    transcoder = site_out != site
    if transcoder and (site, site_out) != (Site("mlp_in", site.layer), Site("mlp", site.layer)):
        raise ValueError(f"a Gemma Scope 2 transcoder reads mlp_in.L and predicts mlp.L; got {site} -> {site_out}")
    params = validate_params({k: np.asarray(v) for k, v in params.items()}, "params to write", transcoder=transcoder)
    width = params["W_enc"].shape[1]
    affine = SKIP_KEY in params
    out = gs2_dir(root, site, width, average_l0, transcoder=transcoder, affine=affine, l0_label=l0_label)
    with atomic_path(out / GS2_PARAMS_FILE) as tmp:
        safetensors.numpy.save_file({GS2_TENSORS[k]: v for k, v in params.items()}, tmp)
    config = dict(zip(GS2_CONFIG_KEYS, (
        HF_HOOK_POINTS[site.kind].format(site.layer), HF_HOOK_POINTS[site_out.kind].format(site_out.layer), width,
        model_name, "jump_relu", round(average_l0), affine, "transcoder" if transcoder else "sae")))
    with atomic_path(out / GS2_CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return out / GS2_PARAMS_FILE


def load_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads and validates an SAE or transcoder: a Gemma Scope 1 ``params.npz``, a Gemma Scope 2
    ``params.safetensors`` (with its ``config.json``), a SAELens JumpReLU ``sae_weights.safetensors`` (with its
    ``cfg.json``, if any), or a directory holding one of them (in that order of preference).

    Returns the float32 arrays of the module docstring (``W_skip`` only for an affine transcoder). A SAELens SAE
    with ``apply_b_dec_to_input`` true is folded into the Gemma Scope convention (``b_enc' = b_enc − b_dec @
    W_enc``, arXiv 2408.05147 §3).

    Raises:
      FileNotFoundError: nothing SAE-like at path.
      ValueError: unreadable file; missing key, wrong shape, non-float dtype, non-finite values, negative
        threshold (naming the key as the file spells it); a config that is not JSON or lacks a key; a GS2
        config.json naming another architecture, type, hook point or width; a SAELens ``cfg.json`` beside the file
        naming another architecture than "jumprelu", a d_in/d_sae other than the weights' or a normalisation other
        than "none". The message names the file and the key.
    """
    path = _params_file(pathlib.Path(path))
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                raw = {k: npz[k] for k in npz.files}
        except Exception as e:  # numpy raises many types for corrupt files; report them uniformly.
            raise ValueError(f"{path}: cannot read SAE parameters ({type(e).__name__}: {e})") from e
        params = validate_params(raw, source=str(path))
    else:
        raw = _read_safetensors(path)
        if path.name == GS2_PARAMS_FILE:
            return _from_gs2(raw, path)
        params = validate_params(raw, source=str(path))
    cfg_path = path.parent / SAELENS_CFG_FILE
    if cfg_path.is_file():
        cfg = _check_saelens_cfg(params, cfg_path)
        if path.suffix == ".safetensors":
            params = _fold_saelens_cfg(params, cfg, cfg_path)
    return params


def find_saes(path: str | pathlib.Path) -> list[pathlib.Path]:
    """SAE and transcoder files named by a command-line path: a params file, an SAE directory, or a release root
    (every ``params.npz`` and ``params.safetensors`` below it, sorted).

    Raises:
      FileNotFoundError: nothing SAE-like at or below path.
    """
    path = pathlib.Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [path / name for name in (PARAMS_FILE, GS2_PARAMS_FILE) if (path / name).is_file()][:1]
        found = found or sorted([*path.rglob(PARAMS_FILE), *path.rglob(GS2_PARAMS_FILE)])
        found = found or ([path / SAELENS_WEIGHTS_FILE] if (path / SAELENS_WEIGHTS_FILE).is_file() else [])
        if found:
            return found
    raise FileNotFoundError(f"no SAE at {path}: expected a params.npz / params.safetensors, an SAE directory or a "
                            "release root")


def sae_info(path: pathlib.Path) -> dict:
    """What a release says about an SAE or transcoder file: ``site`` (the site it reads) and ``site_out`` (the site
    it predicts; ``site`` for an SAE) as strings, from a GS2 ``config.json``, the GS1
    ``<kind>/layer_<L>/width_<W>/average_l0_<K>`` layout or SAELens ``cfg.json`` metadata, and ``l0_coefficient``
    and ``target_l0`` (SAELens metadata); None when unknown.

    Raises:
      ValueError: a GS2 config.json that is malformed (as in ``load_params``).
    """
    if path.name == GS2_PARAMS_FILE:
        site, site_out = _gs2_sites(_read_json(path.parent / GS2_CONFIG_FILE))
        return {"site": str(site), "site_out": str(site_out), "l0_coefficient": None, "target_l0": None}
    cfg_path = path.parent / SAELENS_CFG_FILE
    meta = _read_json(cfg_path).get("metadata", {}) if cfg_path.is_file() else {}
    site = meta.get("site")
    parts = path.parent.parts
    if site is None and len(parts) >= 4 and parts[-3].startswith("layer_") and parts[-3][6:].isdigit():
        kind = parts[-4]
        site = f"{kind}.{parts[-3][6:]}" if kind in sites.KINDS else None
    return {"site": site, "site_out": site, "l0_coefficient": meta.get("l0_coefficient"),
            "target_l0": meta.get("target_l0")}


def validate_params(params: dict[str, np.ndarray], source: str, *, transcoder: bool = False,
                    names: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Checks SAE or transcoder parameters and returns their arrays as float32 (extra keys dropped).

    Expected: ``W_enc [d_in, M]``, ``W_dec [M, d_out]``, ``b_enc [M]``, ``b_dec [d_out]``, ``threshold [M]`` and,
    for a transcoder only, optionally ``W_skip [d_in, d_out]``; ``d_out = d_in`` for an SAE. Floating dtypes, all
    finite, ``threshold >= 0``.

    Args:
      params: arrays under our key names.
      source: what to name in messages (a file path).
      transcoder: whether d_out may differ from d_in and ``W_skip`` may be present.
      names: the file's spelling of each key for messages (e.g. ``GS2_TENSORS``); default ours.

    Raises:
      ValueError: naming ``source``, the offending key and what was expected.
    """
    name = lambda key: repr((names or {}).get(key, key))  # noqa: E731
    keys = PARAM_KEYS + ((SKIP_KEY,) if SKIP_KEY in params else ())
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise ValueError(f"{source}: missing key(s) {[(names or {}).get(k, k) for k in missing]}; an SAE needs "
                         f"{[(names or {}).get(k, k) for k in PARAM_KEYS]} (has {sorted(params)})")
    if SKIP_KEY in params and not transcoder:
        raise ValueError(f"{source}: key {name(SKIP_KEY)} is an affine skip connection; expected one only in a "
                         "transcoder (an SAE reconstructs its input without one)")
    for key in keys:
        if not np.issubdtype(params[key].dtype, np.floating):
            raise ValueError(f"{source}: key {name(key)} has dtype {params[key].dtype}; expected a float dtype")
    for key, what in (("W_enc", "[d_in, width]"), ("W_dec", "[width, d_out]")):
        if params[key].ndim != 2:
            raise ValueError(f"{source}: key {name(key)} has shape {params[key].shape}; expected 2-D {what}")
    d_in, width = params["W_enc"].shape
    d_out = params["W_dec"].shape[1] if transcoder else d_in
    expected = {"W_enc": (d_in, width), "W_dec": (width, d_out), "b_enc": (width,), "b_dec": (d_out,),
                "threshold": (width,), SKIP_KEY: (d_in, d_out)}
    for key in keys:
        if params[key].shape != expected[key]:
            raise ValueError(
                f"{source}: key {name(key)} has shape {params[key].shape}; expected {expected[key]} "
                f"(d_in={d_in}, width={width} from {name('W_enc')} {params['W_enc'].shape}"
                + (f", d_out={d_out} from {name('W_dec')})" if transcoder else ")")
            )
    out = {k: np.asarray(params[k], dtype=np.float32) for k in keys}
    for key, value in out.items():
        if not np.isfinite(value).all():
            raise ValueError(f"{source}: key {name(key)} holds {np.size(value) - np.isfinite(value).sum()} "
                             "non-finite values")
    if (out["threshold"] < 0).any():
        raise ValueError(f"{source}: key {name('threshold')} has negative entries (min {out['threshold'].min()}); "
                         "expected >= 0")
    return out


def _check_average_l0(average_l0: float) -> None:
    if not (math.isfinite(average_l0) and average_l0 >= 0):
        raise ValueError(f"average_l0 must be a finite number >= 0, got {average_l0!r}")


def _params_file(path: pathlib.Path) -> pathlib.Path:
    """The params file a path names: itself, or the first of params.npz / params.safetensors /
    sae_weights.safetensors in a directory."""
    if path.is_dir():
        names = (PARAMS_FILE, GS2_PARAMS_FILE, SAELENS_WEIGHTS_FILE)
        found = next((path / name for name in names if (path / name).is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path} holds none of {list(names)}")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"no SAE file at {path}")
    return path


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load_file(path)
    except Exception as e:  # safetensors raises several types for corrupt files; report them uniformly.
        raise ValueError(f"{path}: cannot read SAE parameters ({type(e).__name__}: {e})") from e


def _read_json(path: pathlib.Path) -> dict:
    """A JSON object from ``path``. Raises ValueError (FileNotFoundError if absent) naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; expected it next to the SAE's parameters")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8 or not JSON
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _from_gs2(raw: dict[str, np.ndarray], path: pathlib.Path) -> dict[str, np.ndarray]:
    """Our params from a GS2 params.safetensors, checked against its config.json."""
    config_path = path.parent / GS2_CONFIG_FILE
    config = _read_json(config_path)
    site, site_out = _gs2_sites(config, config_path)
    ours = {v: k for k, v in GS2_TENSORS.items()}
    params = validate_params({ours[k]: v for k, v in raw.items() if k in ours}, str(path),
                             transcoder=site_out != site, names=GS2_TENSORS)
    affine = config.get("affine_connection", False)
    if affine is not (SKIP_KEY in params):
        raise ValueError(f"{config_path}: 'affine_connection' is {affine!r} but {path.name} "
                         f"{'lacks' if affine is True else 'holds'} 'affine_skip_connection'; expected them to agree")
    width = params["W_enc"].shape[1]
    if config.get("width", width) != width:
        raise ValueError(f"{config_path}: 'width' is {config['width']!r}; expected {width} as 'w_enc' "
                         f"{params['W_enc'].shape} has")
    return params


def _gs2_sites(config: dict, source: pathlib.Path | str = "config.json") -> tuple[Site, Site]:
    """(site read, site predicted) of a GS2 config: an SAE's hook points are equal, a transcoder reads mlp_in.L and
    predicts mlp.L. Raises ValueError naming the key for any other architecture, type or hook point."""
    expected = {"architecture": ("jump_relu",), "type": ("sae", "transcoder")}
    for key, allowed in expected.items():
        if config.get(key) not in allowed:
            raise ValueError(f"{source}: {key!r} is {config.get(key)!r}; expected one of {list(allowed)}")
    site = _site_of_hook_point(config.get("hf_hook_point_in"), "hf_hook_point_in", source)
    site_out = _site_of_hook_point(config.get("hf_hook_point_out", config.get("hf_hook_point_in")),
                                   "hf_hook_point_out", source)
    wanted = (Site("mlp_in", site.layer), Site("mlp", site.layer)) if config["type"] == "transcoder" else (site, site)
    if (site, site_out) != wanted or site.kind not in (("mlp_in",) if config["type"] == "transcoder" else sites.KINDS):
        raise ValueError(f"{source}: a GS2 {config['type']} reading {config.get('hf_hook_point_in')!r} writes "
                         f"{config.get('hf_hook_point_out')!r}; expected hook points "
                         f"{HF_HOOK_POINTS[wanted[0].kind].format(site.layer)!r} -> "
                         f"{HF_HOOK_POINTS[wanted[1].kind].format(site.layer)!r}")
    return site, site_out


def _site_of_hook_point(point, key: str, source) -> Site:
    """The site of a Hugging Face hook point (``HF_HOOK_POINTS``); a prefix before ``layers.`` is allowed."""
    for kind, pattern in HF_HOOK_POINTS.items():
        match = re.fullmatch(r"(?:.*\.)?" + re.escape(pattern.removeprefix("model.")).replace(r"\{\}", r"(\d+)"),
                             point if isinstance(point, str) else "")
        if match:
            return Site(kind, int(match.group(1)))
    raise ValueError(f"{source}: {key!r} is {point!r}; expected a Gemma hook point such as "
                     f"{[p.format('L') for p in HF_HOOK_POINTS.values()]}")


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
    cfg = _read_json(cfg_path)
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
