"""Reading any release: the files a command-line path names, and the SAE or transcoder in one whatever its layout
(Gemma Scope 1 ``params.npz`` and SAELens, ``release.gs1``; Gemma Scope 2, ``release.gs2``), and the cross-layer
transcoders and crosscoders of Gemma Scope 2 (``release.gs2_crosslayer``: a directory of
``params_layer_*.safetensors``) and circuit-tracer's CLTs and transcoder sets (``release.circuit_tracer``: a
directory with ``config.yaml``), each named by its directory."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from gemma_scope import sites
from gemma_scope.release.circuit_tracer import circuit_tracer_layers, is_circuit_tracer_dir, read_circuit_tracer
from gemma_scope.release.gs1 import PARAMS_FILE, SAELENS_CFG_FILE, SAELENS_WEIGHTS_FILE, load_gs1
from gemma_scope.release.gs2 import GS2_CONFIG_FILE, GS2_PARAMS_FILE, gs2_sites, load_gs2
from gemma_scope.release.gs2_crosslayer import (
    LAYER_FILE_RE,
    crosslayer_kind,
    crosslayer_layers,
    is_crosslayer_dir,
    read_crosslayer,
)
from gemma_scope.release.params import read_json


def load_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads and validates an SAE or transcoder: a Gemma Scope 1 ``params.npz``, a Gemma Scope 2
    ``params.safetensors`` (with its ``config.json``), a SAELens JumpReLU ``sae_weights.safetensors`` (with its
    ``cfg.json``, if any), or a directory holding one of them (in that order of preference).

    A CLT or crosscoder directory gives ``gemma_scope.sae.crosslayer``'s params instead (``load_crosslayer``;
    ``crosslayer.kind`` tells them apart).

    Returns the float32 arrays of ``release.params`` (``W_skip`` only for an affine transcoder). A SAELens SAE
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
    if path.is_dir():
        return load_crosslayer(path)[0]
    return load_gs2(path) if path.name == GS2_PARAMS_FILE else load_gs1(path)


def find_saes(path: str | pathlib.Path) -> list[pathlib.Path]:
    """SAE and transcoder files named by a command-line path: a params file, an SAE directory, or a release root
    (every ``params.npz`` and ``params.safetensors`` below it, sorted). A CLT or crosscoder is named by its
    directory (the one holding ``params_layer_*.safetensors``), itself or below a root.

    Raises:
      FileNotFoundError: nothing SAE-like at or below path.
    """
    path = pathlib.Path(path)
    if path.is_file() and _is_multi(path.parent):  # one file of a CLT or crosscoder names its directory
        return [path.parent]
    if path.is_file():
        return [path]
    if path.is_dir():
        if _is_multi(path):
            return [path]
        found = [path / name for name in (PARAMS_FILE, GS2_PARAMS_FILE) if (path / name).is_file()][:1]
        multi = {p.parent for p in path.rglob("params_layer_*.safetensors") if LAYER_FILE_RE.fullmatch(p.name)}
        multi |= {p.parent for p in path.rglob("config.yaml") if is_circuit_tracer_dir(p.parent)}
        found = found or sorted([*path.rglob(PARAMS_FILE), *path.rglob(GS2_PARAMS_FILE), *multi])
        found = found or ([path / SAELENS_WEIGHTS_FILE] if (path / SAELENS_WEIGHTS_FILE).is_file() else [])
        if found:
            return found
    raise FileNotFoundError(f"no SAE at {path}: expected a params.npz / params.safetensors, an SAE directory or a "
                            "release root")


def sae_info(path: pathlib.Path) -> dict:
    """What a release says about an SAE or transcoder file: ``site`` (the site it reads) and ``site_out`` (the site
    it predicts; ``site`` for an SAE) as strings, from a GS2 ``config.json``, the GS1
    ``<kind>/layer_<L>/width_<W>/average_l0_<K>`` layout or SAELens ``cfg.json`` metadata, and ``l0_coefficient``
    and ``target_l0`` (SAELens metadata, or a GS2 CLT's or crosscoder's config.json as our trainer writes it); None
    when unknown. For a CLT or crosscoder directory also ``kind``
    ("clt" | "crosscoder") and ``layers`` (the covered model layers); ``site`` / ``site_out`` are then those of
    its first layer (``mlp_in.L`` / ``mlp.L``, or ``res.L``).

    Raises:
      ValueError: a GS2 config.json that is malformed (as in ``load_params``).
    """
    if path.is_dir() and is_circuit_tracer_dir(path):
        layers = circuit_tracer_layers(path)
        return {"site": "mlp_in.0", "site_out": "mlp.0", "l0_coefficient": None, "target_l0": None, "kind": "clt",
                "layers": layers}
    if path.is_dir() and is_crosslayer_dir(path):
        kind, layers = crosslayer_kind(path), crosslayer_layers(path)
        site, site_out = (("mlp_in", "mlp") if kind == "clt" else ("res", "res"))
        config = read_json(path / GS2_CONFIG_FILE) if (path / GS2_CONFIG_FILE).is_file() else {}
        return {"site": f"{site}.{layers[0]}", "site_out": f"{site_out}.{layers[0]}",
                "l0_coefficient": config.get("l0_coefficient"), "target_l0": config.get("target_l0"), "kind": kind,
                "layers": layers}
    if path.name == GS2_PARAMS_FILE:
        site, site_out = gs2_sites(read_json(path.parent / GS2_CONFIG_FILE))
        return {"site": str(site), "site_out": str(site_out), "l0_coefficient": None, "target_l0": None}
    cfg_path = path.parent / SAELENS_CFG_FILE
    meta = read_json(cfg_path).get("metadata", {}) if cfg_path.is_file() else {}
    site = meta.get("site")
    parts = path.parent.parts
    if site is None and len(parts) >= 4 and parts[-3].startswith("layer_") and parts[-3][6:].isdigit():
        kind = parts[-4]
        site = f"{kind}.{parts[-3][6:]}" if kind in sites.KINDS else None
    return {"site": site, "site_out": site, "l0_coefficient": meta.get("l0_coefficient"),
            "target_l0": meta.get("target_l0")}


def load_crosslayer(path: str | os.PathLike, *, n_layers: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """A CLT or crosscoder directory: Gemma Scope 2's (``gs2_crosslayer.read_crosslayer``) or circuit-tracer's
    (``circuit_tracer.read_circuit_tracer``); returns (``crosslayer``'s params, info with ``kind``, ``layers``,
    ``n_layers`` (a CLT's), ``d_model``, ``width``, ``affine``, ``average_l0``, ``model_name``).

    Raises:
      FileNotFoundError / ValueError: as those readers (one line naming the file, the key and the expected
        shape), e.g. a CLT whose layer axis is not ``n_layers`` (the model's, when given).
    """
    path = pathlib.Path(path)
    if is_circuit_tracer_dir(path):
        return read_circuit_tracer(path, n_layers=n_layers)
    return read_crosslayer(path, n_layers=n_layers)


def _is_multi(path: pathlib.Path) -> bool:
    return is_crosslayer_dir(path) or is_circuit_tracer_dir(path)


def load_sae(path: str | os.PathLike, site: str | None) -> tuple[pathlib.Path, dict[str, np.ndarray], sites.Site]:
    """One SAE named on a command line: (its file, folded params as ``load_params`` returns them, the site it
    reads).

    ``site`` (e.g. "res.8") wins over what the release path or SAELens metadata says (``sae_info``).

    Raises:
      FileNotFoundError: nothing SAE-like at path. ValueError: several SAEs under path, an unknown site, or a
      malformed SAE file (``load_params``).
    """
    found = find_saes(path)
    if len(found) != 1:
        listed = "\n  ".join(map(str, found))
        raise ValueError(f"{path} holds {len(found)} SAEs; pass one of them:\n  {listed}")
    file = found[0]
    if _is_multi(file):
        raise ValueError(f"{file} is a {sae_info(file)['kind']} (several layers); this command takes one SAE or "
                         "transcoder (python -m gemma_scope.evaluate takes CLTs and crosscoders)")
    site = site or sae_info(file)["site"]
    if site is None:
        raise ValueError(f"{file}: cannot tell which site the SAE reads; pass --site (e.g. --site=res.8)")
    return file, load_params(file), sites.Site.parse(site)


def _params_file(path: pathlib.Path) -> pathlib.Path:
    """The params file a path names: itself, or the first of params.npz / params.safetensors /
    sae_weights.safetensors in a directory."""
    if path.is_dir() and _is_multi(path):
        return path
    if path.is_dir():
        names = (PARAMS_FILE, GS2_PARAMS_FILE, SAELENS_WEIGHTS_FILE)
        found = next((path / name for name in names if (path / name).is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path} holds none of {list(names)}")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"no SAE file at {path}")
    return path


