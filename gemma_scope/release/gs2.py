"""The Gemma Scope 2 release layout of SAEs and transcoders, written and read back. The arrays are those of
``release.params``.

``<root>/<folder>/layer_<L>_width_<W>_l0_<bucket>[_affine]/`` holds ``params.safetensors`` (lowercase ``w_enc``,
``w_dec``, ``b_enc``, ``b_dec``, ``threshold``, optional ``affine_skip_connection [d_in, d_out]``) and
``config.json`` with GS2's keys (``GS2_CONFIG_KEYS``); folders ``resid_post_all``, ``attn_out_all``,
``mlp_out_all``, ``transcoder_all``; bucket from the L0 (``l0_bucket``).
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
from gemma_scope.release.params import (
    SKIP_KEY,
    check_average_l0,
    read_json,
    read_safetensors,
    validate_params,
    width_label,
)
from gemma_scope.sites import Site

GS2_PARAMS_FILE = "params.safetensors"
GS2_CONFIG_FILE = "config.json"
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


def l0_bucket(average_l0: float) -> str:
    """Gemma Scope 2's L0 bucket for a mean L0: "small" (its band 10–20), "medium" (30–60) or "big" (90–150).

    GS2 names its training targets; we name the achieved L0 (``config.json``'s ``l0`` records it, rounded). An L0
    between two bands goes to the nearer one on a log scale, i.e. the boundaries are the geometric means of the
    facing band edges (√(20·30) ≈ 24.5 and √(60·90) ≈ 73.5); below 10 is "small" and above 150 "big".

    Raises:
      ValueError: average_l0 negative or not finite.
    """
    check_average_l0(average_l0)
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
              model_name: str, site_out: Site | None = None, l0_label: str | None = None,
              l0_measured_on: str | None = None) -> pathlib.Path:
    """Writes an SAE or transcoder in the Gemma Scope 2 layout (module docstring); returns the params file path.

    Args:
      root: release root directory (created if missing).
      site: the site it reads.
      params: folded params in raw-activation space (``release.params``), any float dtype; stored as float32.
        ``W_skip`` present makes the ``_affine`` variant (``affine_skip_connection``).
      average_l0: mean L0 on evaluation tokens; gives the bucket (``l0_bucket``) and config.json's ``l0``.
      model_name: config.json's ``model_name`` (GS2 writes the Hugging Face id, e.g. "google/gemma-3-270m-pt").
      site_out: the site it predicts: None or ``site`` for an SAE; ``mlp.L`` for a transcoder reading ``mlp_in.L``.
      l0_label: the directory's ``l0_`` label (``gs2_labels``, for a sweep); default the L0's bucket.
      l0_measured_on: which text average_l0 was measured on; written as config.json's ``l0_measured_on`` (our
        extension; GS2 has no such key) when given.

    Raises:
      ValueError: params failing ``validate_params``; sites GS2 has no layout for; a bad average_l0.
    """
    site_out = site_out or site
    transcoder = site_out != site
    if transcoder and (site, site_out) != sites.transcoder_pair(site.layer):
        raise ValueError(f"a Gemma Scope 2 transcoder reads mlp_in.L and predicts mlp.L; got {site} -> {site_out}")
    params = validate_params({k: np.asarray(v) for k, v in params.items()}, "params to write", transcoder=transcoder)
    width = params["W_enc"].shape[1]
    affine = SKIP_KEY in params
    out = gs2_dir(root, site, width, average_l0, transcoder=transcoder, affine=affine, l0_label=l0_label)
    with atomic_path(out / GS2_PARAMS_FILE, sum(v.nbytes for v in params.values())) as tmp:
        safetensors.numpy.save_file({GS2_TENSORS[k]: v for k, v in params.items()}, tmp)
    config = dict(zip(GS2_CONFIG_KEYS, (
        HF_HOOK_POINTS[site.kind].format(site.layer), HF_HOOK_POINTS[site_out.kind].format(site_out.layer), width,
        model_name, "jump_relu", round(average_l0), affine, "transcoder" if transcoder else "sae")))
    if l0_measured_on is not None:
        config["l0_measured_on"] = l0_measured_on
    text = json.dumps(config, indent=2)
    with atomic_path(out / GS2_CONFIG_FILE, len(text)) as tmp:
        tmp.write_text(text)
    return out / GS2_PARAMS_FILE


def load_gs2(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Reads a Gemma Scope 2 ``params.safetensors`` and checks it against its ``config.json``; returns our params
    (``release.params``; ``W_skip`` only for an affine transcoder).

    Raises:
      FileNotFoundError: no config.json beside the file.
      ValueError: as ``release.load_params`` for a GS2 file (naming the file and the key as GS2 spells it).
    """
    raw = read_safetensors(path)
    config_path = path.parent / GS2_CONFIG_FILE
    config = read_json(config_path)
    site, site_out = gs2_sites(config, config_path)
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


def gs2_sites(config: dict, source: pathlib.Path | str = "config.json") -> tuple[Site, Site]:
    """(site read, site predicted) of a GS2 config (a ``config.json`` as a dict; ``source`` names it in messages):
    an SAE's hook points are equal, a transcoder reads mlp_in.L and predicts mlp.L.

    Raises:
      ValueError: naming the key, for any other architecture, type or hook point.
    """
    expected = {"architecture": ("jump_relu",), "type": ("sae", "transcoder")}
    for key, allowed in expected.items():
        if config.get(key) not in allowed:
            raise ValueError(f"{source}: {key!r} is {config.get(key)!r}; expected one of {list(allowed)}")
    site = _site_of_hook_point(config.get("hf_hook_point_in"), "hf_hook_point_in", source)
    site_out = _site_of_hook_point(config.get("hf_hook_point_out", config.get("hf_hook_point_in")),
                                   "hf_hook_point_out", source)
    wanted = sites.transcoder_pair(site.layer) if config["type"] == "transcoder" else (site, site)
    if (site, site_out) != wanted:
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
