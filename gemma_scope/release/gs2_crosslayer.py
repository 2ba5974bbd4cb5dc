"""Gemma Scope 2's layouts of the multi-layer dictionaries, written and read back: cross-layer transcoders
(``clt/<variant>/``) and crosscoders (``crosscoder/<variant>/``). In memory they are the float32 params of
``gemma_scope.sae.crosslayer`` (n covered layers in order, raw activations, normalisation folded in).

**CLT** ``<root>/clt/width_<W>_l0_<bucket>[_affine]/`` (W = the total width n·F, as GS2 names its 1B CLT
"262k" for 26 × 10,080; bucket from the mean over covered layers of their L0, ``gs2.l0_bucket``). One file
``params_layer_<l>.safetensors`` per covered MODEL layer l (source index i), float32, GS2's lowercase keys:

    w_enc [d, F]  = W_enc[i]            b_enc [F] = b_enc[i]         threshold [F] = threshold[i]
    w_dec [F, n_layers, d]              full length over the model's n_layers: slot l' holds W_dec[i, :, j] for the
                                        covered layer l' = l_j ≥ l, every other slot (below l, or a layer the CLT
                                        does not cover) is zero
    b_dec [d]     = b_dec[i]            (the bias of layer l's OUTPUT, mlp.l)
    affine_skip_connection [d, d] = W_skip[i]   (optional; same-layer ``x_l @ A``)

so ``ŷ_l' = Σ_{l ≤ l'} f_l @ w_dec_l[:, l', :] + b_dec_l' (+ x_l' @ A_l')`` as circuit-tracer's
``load_gemma_scope_2_clt`` computes it (it slices ``w_dec[:, l:, :]``). GS2's CLTs cover every layer; a CLT of
some layers only (our extension) has ``layer_<l>_<l'>_..._`` before ``width_`` and files for those layers only.

**Crosscoder** ``<root>/crosscoder/layer_<l_0>_<l_1>_..._width_<W>_l0_<bucket>/params_layer_<k>.safetensors``,
k = 0..n−1 the covered layer's index (GS2's ``layer_7_13_17_22_width_262k_l0_medium``: ``params_layer_0..3`` of
65,536 latents each). Public loaders of GS2's crosscoders (a ``JumpReLUMultiLayerSAE`` stacking the files; no
peer library loads them) show the layout: file k holds its own BLOCK of latents, encoded from layer k alone and
decoded to all n layers: ``w_enc [d, F_k]``, ``b_enc [F_k]``, ``threshold [F_k]``, ``w_dec [F_k, n, d]``,
``b_dec [d]`` (the bias of layer k's reconstruction). That is our crosscoder (F shared latents, ``pre = Σ_i x_i @
W_enc[i] + b_enc``) with F = Σ F_k and ``W_enc`` block-diagonal, as reading builds it. Writing splits our latents
into n contiguous blocks (``np.array_split``); a ``W_enc`` that is not block-diagonal (latents reading every
layer, Lindsey et al.) does not fit GS2's keys, so each file then also holds ``w_enc_all_layers [n, d, F_k]``
(our extension, config.json ``"encoder": "all_layers"``), which a strict loader of GS2's keys refuses.

``config.json`` of both: GS2's keys as for its SAEs (``architecture`` "jump_relu", ``model_name``,
``hf_hook_point_in`` / ``hf_hook_point_out`` with ``{layer}`` for the layer, ``width`` (total), ``l0``,
``affine_connection``, ``type`` "clt" | "crosscoder") plus ours (``layers``, ``n_layers``, ``d_model``,
``width_per_layer``, ``average_l0``, ``encoder``) and the caller's metadata. The readers need none of it: a
directory of bare ``params_layer_*.safetensors`` (as an independent writer makes them) reads, its kind taken from
the config's ``type`` or else from the folder (``clt`` / ``crosscoder``).
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import numpy as np
import safetensors.numpy

from gemma_scope.files import atomic_path, json_ready
from gemma_scope.release.gs2 import GS2_CONFIG_FILE, HF_HOOK_POINTS, l0_bucket
from gemma_scope.release.params import (
    check_average_l0,
    check_tensors,
    read_json,
    read_safetensors,
    tensor_shape,
    width_label,
)

CLT_FOLDER = "clt"
CROSSCODER_FOLDER = "crosscoder"
LAYER_FILE = "params_layer_{}.safetensors"
LAYER_FILE_RE = re.compile(r"params_layer_(\d+)\.safetensors")
SKIP = "affine_skip_connection"
ALL_LAYERS_ENC = "w_enc_all_layers"  # our extension for a crosscoder whose latents read every layer


def clt_variant(layers: list[int], n_layers: int, width_total: int, average_l0: list[float], *, affine: bool,
                l0_label: str | None = None) -> str:
    """The variant directory name of a CLT (module docstring), e.g. ``width_262k_l0_medium_affine``; a CLT of
    some layers only gets ``layer_4_8_12_`` in front."""
    prefix = "" if list(layers) == list(range(n_layers)) else "layer_" + "_".join(map(str, layers)) + "_"
    label = l0_label or l0_bucket(float(np.mean(average_l0)))
    return f"{prefix}width_{width_label(width_total)}_l0_{label}{'_affine' if affine else ''}"


def crosscoder_variant(layers: list[int], width: int, average_l0: float, *, l0_label: str | None = None) -> str:
    """The variant directory name of a crosscoder, e.g. ``layer_7_13_17_22_width_262k_l0_medium``."""
    return f"layer_{'_'.join(map(str, layers))}_width_{width_label(width)}_l0_{l0_label or l0_bucket(average_l0)}"


def write_clt(root: str | os.PathLike, params: dict, layers: list[int], *, n_layers: int, average_l0: list[float],
              metadata: dict | None = None, l0_label: str | None = None) -> pathlib.Path:
    """Writes a CLT in Gemma Scope 2's layout (module docstring); returns the variant directory.

    Args:
      root: release root (``clt/`` is made under it).
      params: folded float32 params in ``crosslayer``'s CLT layout: ``W_enc [n, d, F]``, ``b_enc [n, F]``,
        ``threshold [n, F]``, ``W_dec [n, F, n, d]``, ``b_dec [n, d]``, optional ``W_skip [n, d, d]``. Entries
        ``W_dec[i, :, j < i]`` are not written (``crosslayer`` masks them; the file's slots are zero).
      layers: the n covered model layers, increasing (zero-based).
      n_layers: the model's layer count: the length of each file's ``w_dec`` layer axis.
      average_l0: n mean L0s, one per covered layer (config.json ``average_l0``; their mean names the bucket).
      metadata: provenance merged into config.json (e.g. ``model_name``, the recipe); may not override our keys.
      l0_label: the variant's ``l0_`` label instead of the bucket (``gs2.gs2_labels``, for a sweep).

    Raises:
      ValueError: params of the wrong shapes or non-finite, layers not increasing within ``[0, n_layers)``, a bad
        average_l0, or metadata naming one of our config keys.
    """
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    layers = _check_layers(layers, n_layers)
    n = len(layers)
    d, width = _check_params(params, n, "CLT")
    average_l0 = [float(a) for a in average_l0]
    if len(average_l0) != n:
        raise ValueError(f"average_l0 has {len(average_l0)} entries; expected one per covered layer ({n})")
    for a in average_l0:
        check_average_l0(a)
    affine = "W_skip" in params
    out = pathlib.Path(root) / CLT_FOLDER / clt_variant(layers, n_layers, n * width, average_l0, affine=affine,
                                                        l0_label=l0_label)
    config = _config("clt", metadata, width=n * width, width_per_layer=width, layers=layers, n_layers=n_layers,
                     d_model=d, l0=round(sum(average_l0) / n), average_l0=average_l0, affine=affine,
                     encoder="per_layer", kinds=("mlp_in", "mlp"))
    for i, layer in enumerate(layers):
        w_dec = np.zeros((width, n_layers, d), np.float32)
        w_dec[:, layers[i:], :] = params["W_dec"][i, :, i:, :]
        tensors = {"w_enc": params["W_enc"][i], "b_enc": params["b_enc"][i], "threshold": params["threshold"][i],
                   "w_dec": w_dec, "b_dec": params["b_dec"][i]}
        if affine:
            tensors[SKIP] = params["W_skip"][i]
        _save(out / LAYER_FILE.format(layer), tensors)
    _write_config(out, config)
    return out


def write_crosscoder(root: str | os.PathLike, params: dict, layers: list[int], *, average_l0: float,
                     metadata: dict | None = None, l0_label: str | None = None) -> pathlib.Path:
    """Writes a crosscoder in Gemma Scope 2's layout (module docstring); returns the variant directory.

    Args:
      root: release root (``crosscoder/`` is made under it).
      params: folded float32 params in ``crosslayer``'s crosscoder layout: ``W_enc [n, d, F]``, ``b_enc [F]``,
        ``threshold [F]``, ``W_dec [F, n, d]``, ``b_dec [n, d]``; F ≥ n.
      layers: the n model layers whose ``res`` it reads and reconstructs, increasing.
      average_l0: its mean L0 (all F latents; names the bucket).
      metadata: provenance merged into config.json (e.g. ``model_name``).
      l0_label: the ``l0_`` label instead of the bucket.

    Raises:
      ValueError: params of the wrong shapes or non-finite, F < n, layers not increasing, a bad average_l0.
    """
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    layers = _check_layers(layers, None)
    n = len(layers)
    d, width = _check_params(params, n, "crosscoder")
    if width < n:
        raise ValueError(f"a crosscoder of {n} layers needs at least {n} latents to split into files; has {width}")
    check_average_l0(float(average_l0))
    blocks = np.array_split(np.arange(width), n)
    block_diagonal = all(not params["W_enc"][i][:, blocks[k]].any() for k in range(n) for i in range(n) if i != k)
    out = pathlib.Path(root) / CROSSCODER_FOLDER / crosscoder_variant(layers, width, float(average_l0),
                                                                      l0_label=l0_label)
    config = _config("crosscoder", metadata, width=width, width_per_layer=[len(b) for b in blocks], layers=layers,
                     n_layers=None, d_model=d, l0=round(float(average_l0)), average_l0=float(average_l0),
                     affine=False, encoder="per_layer" if block_diagonal else "all_layers", kinds=("res", "res"))
    for k, block in enumerate(blocks):
        tensors = {"w_enc": params["W_enc"][k][:, block], "b_enc": params["b_enc"][block], "b_dec": params["b_dec"][k],
                   "threshold": params["threshold"][block], "w_dec": params["W_dec"][block]}
        if not block_diagonal:
            tensors[ALL_LAYERS_ENC] = params["W_enc"][:, :, block]
        _save(out / LAYER_FILE.format(k), tensors)
    _write_config(out, config)
    return out


def is_crosslayer_dir(path: pathlib.Path) -> bool:
    """Whether ``path`` is a directory holding ``params_layer_*.safetensors`` (a GS2 CLT or crosscoder)."""
    return path.is_dir() and any(LAYER_FILE_RE.fullmatch(p.name) for p in path.iterdir())


def crosslayer_kind(path: pathlib.Path) -> str:
    """``"clt"`` or ``"crosscoder"`` for a GS2 multi-layer directory: config.json's ``type`` when it is one of
    them, else the folder above it (``clt`` / ``crosscoder``).

    Raises:
      ValueError: naming the directory, when neither tells.
    """
    config_path = path / GS2_CONFIG_FILE
    kind = read_json(config_path).get("type") if config_path.is_file() else None
    if kind not in ("clt", "crosscoder"):  # GS2's own config.json may say "transcoder": the folder decides
        kind = {CLT_FOLDER: "clt", CROSSCODER_FOLDER: "crosscoder"}.get(path.parent.name, kind)
    if kind not in ("clt", "crosscoder"):
        raise ValueError(f"{path}: cannot tell a CLT from a crosscoder: config.json 'type' is {kind!r} and the "
                         f"folder above is {path.parent.name!r}; expected type 'clt' or 'crosscoder', or a folder "
                         f"{CLT_FOLDER!r} / {CROSSCODER_FOLDER!r}")
    return kind


def crosslayer_layers(path: pathlib.Path) -> list[int]:
    """The covered model layers of a GS2 multi-layer directory without reading its tensors: a CLT's file numbers;
    a crosscoder's config.json ``layers`` or directory name.

    Raises:
      FileNotFoundError / ValueError: as ``crosslayer_kind``, or a crosscoder whose layers are unknown.
    """
    if crosslayer_kind(path) == "clt":
        return sorted(_layer_files(path))
    layers = _read_config(path).get("layers") or _layers_from_name(path.name)
    if layers is None:
        raise ValueError(f"{path}: a crosscoder's covered layers are in config.json 'layers' or its name "
                         "('layer_7_13_17_22_width_...'); found neither")
    return list(layers)


def read_clt(path: str | os.PathLike, *, n_layers: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Reads a GS2 CLT directory into ``crosslayer``'s CLT params (float32) and what it is.

    Args:
      path: the variant directory (``params_layer_<l>.safetensors``, config.json optional).
      n_layers: the model's layer count, when known (evaluation): each ``w_dec`` must be that long.

    Returns:
      (params, info): params as ``write_clt`` takes them; info ``{"kind": "clt", "layers", "n_layers",
      "d_model", "width" (per layer), "affine", "average_l0" (list or None), "model_name", "config"}``.

    Raises:
      FileNotFoundError: no ``params_layer_*.safetensors`` in path.
      ValueError: one line naming the file, the key and the expected shape: a missing key, a shape that disagrees
        with ``w_enc`` or across files, a layer axis other than n_layers (or config.json's), non-zero ``w_dec``
        slots below the source layer or at a layer the CLT does not cover, non-float / non-finite values, a
        negative threshold, a skip connection in some files only.
    """
    path = pathlib.Path(path)
    files = _layer_files(path)
    config = _read_config(path)
    layers = sorted(files)
    if None not in (config.get("n_layers"), n_layers) and config["n_layers"] != n_layers:
        raise ValueError(f"{path / GS2_CONFIG_FILE}: 'n_layers' is {config['n_layers']}; expected {n_layers} (the "
                         "model's)")
    first = read_safetensors(files[layers[0]])  # n_layers: the model's, else config.json's, else this file's
    n_layers = n_layers or config.get("n_layers") or tensor_shape(first, "w_dec", files[layers[0]],
                                                                  "[width, n_layers, d_model]")[1]
    if layers[-1] >= n_layers:
        raise ValueError(f"{files[layers[-1]]}: a source layer outside a model of n_layers={n_layers}; expected "
                         f"params_layer_0 .. params_layer_{n_layers - 1}")
    d, width = tensor_shape(first, "w_enc", files[layers[0]], "[d_model, width]")
    skip, n = SKIP in first, len(layers)
    expected = {"w_enc": (d, width), "b_enc": (width,), "threshold": (width,), "w_dec": (width, n_layers, d),
                "b_dec": (d,)} | ({SKIP: (d, d)} if skip else {})
    w_dec, small = np.zeros((n, width, n, d), np.float32), []
    for i, layer in enumerate(layers):  # one file in memory at a time beside the dense W_dec
        raw = first if i == 0 else read_safetensors(files[layer])
        check_tensors(raw, expected, files[layer], f"d_model={d}, width={width} from "
                      f"{files[layers[0]].name} 'w_enc', n_layers={n_layers}")
        if np.any(raw["w_dec"][:, :layer]):
            raise ValueError(f"{files[layer]}: key 'w_dec' {raw['w_dec'].shape} has non-zero slots below source "
                             f"layer {layer} (max |w| {np.abs(raw['w_dec'][:, :layer]).max():.3g}); expected "
                             f"w_dec[:, :{layer}, :] zero")
        uncovered = [t for t in range(layer, n_layers) if t not in files]
        if uncovered and np.any(raw["w_dec"][:, uncovered]):
            raise ValueError(f"{files[layer]}: key 'w_dec' writes to layers {uncovered}, which have no "
                             f"params_layer file; expected those slots zero (the CLT covers {layers})")
        w_dec[i, :, i:, :] = raw.pop("w_dec")[:, layers[i:], :]
        small.append({k: v.astype(np.float32) for k, v in raw.items()})
        first = raw = None
    stack = lambda key: np.stack([one[key] for one in small])  # noqa: E731
    params = {"W_enc": stack("w_enc"), "b_enc": stack("b_enc"), "threshold": stack("threshold"), "W_dec": w_dec,
              "b_dec": stack("b_dec")} | ({"W_skip": stack(SKIP)} if skip else {})
    _check_config(config, path, layers=layers, affine_connection=skip, width=n * width)
    info = {"kind": "clt", "layers": layers, "n_layers": n_layers, "d_model": d, "width": width, "affine": skip,
            "average_l0": config.get("average_l0"), "model_name": config.get("model_name"), "config": config}
    return params, info


def read_crosscoder(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Reads a GS2 crosscoder directory into ``crosslayer``'s crosscoder params (float32) and what it is.

    The covered model layers come from config.json's ``layers`` or the directory name (``layer_7_13_17_22_...``).

    Returns:
      (params, info): params as ``write_crosscoder`` takes them (``W_enc`` block-diagonal unless the files hold
      ``w_enc_all_layers``); info ``{"kind": "crosscoder", "layers", "d_model", "width" (total), "affine": False,
      "average_l0", "model_name", "config"}``.

    Raises:
      FileNotFoundError: no ``params_layer_*.safetensors`` in path.
      ValueError: one line naming the file, the key and the expected shape; files not numbered 0..n−1; a layer
        axis of ``w_dec`` other than n; covered layers unknown or not n of them.
    """
    path = pathlib.Path(path)
    files = _layer_files(path)
    config = _read_config(path)
    n = len(files)
    if sorted(files) != list(range(n)):
        raise ValueError(f"{path}: crosscoder files are numbered {sorted(files)}; expected params_layer_0 .. "
                         f"params_layer_{n - 1}, one per covered layer")
    layers = config.get("layers") or _layers_from_name(path.name)
    if layers is None or len(layers) != n:
        raise ValueError(f"{path}: covered layers {layers!r} (config.json 'layers' or the name 'layer_7_13_..._')"
                         f"; expected {n}, one per params_layer file")
    arrays = [read_safetensors(files[k]) for k in range(n)]
    d = tensor_shape(arrays[0], "w_enc", files[0], "[d_model, width]")[0]
    all_layers = ALL_LAYERS_ENC in arrays[0]
    blocks = []
    for k, raw in enumerate(arrays):
        width_k = tensor_shape(raw, "w_enc", files[k], "[d_model, width]")[1]
        expected = {"w_enc": (d, width_k), "b_enc": (width_k,), "threshold": (width_k,), "w_dec": (width_k, n, d),
                    "b_dec": (d,)} | ({ALL_LAYERS_ENC: (n, d, width_k)} if all_layers else {})
        check_tensors(raw, expected, files[k], f"d_model={d} from {files[0].name} 'w_enc', width {width_k} from "
                      f"its own 'w_enc', n={n} files")
        blocks.append(width_k)
    width = sum(blocks)
    w_enc = np.zeros((n, d, width), np.float32)
    start = 0
    for k, raw in enumerate(arrays):
        stop = start + blocks[k]
        if all_layers:
            w_enc[:, :, start:stop] = raw[ALL_LAYERS_ENC]
        else:
            w_enc[k, :, start:stop] = raw["w_enc"]
        start = stop
    cat = lambda key: np.concatenate([raw[key].astype(np.float32) for raw in arrays])  # noqa: E731
    params = {"W_enc": w_enc, "b_enc": cat("b_enc"), "threshold": cat("threshold"), "W_dec": cat("w_dec"),
              "b_dec": np.stack([raw["b_dec"].astype(np.float32) for raw in arrays])}
    _check_config(config, path, layers=list(layers), affine_connection=False, width=width)
    info = {"kind": "crosscoder", "layers": list(layers), "d_model": d, "width": width, "affine": False,
            "average_l0": config.get("average_l0"), "model_name": config.get("model_name"), "config": config}
    return params, info


def read_crosslayer(path: str | os.PathLike, *, n_layers: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """``read_clt`` or ``read_crosscoder``, by ``crosslayer_kind``."""
    path = pathlib.Path(path)
    if crosslayer_kind(path) == "clt":
        return read_clt(path, n_layers=n_layers)
    return read_crosscoder(path)


def _check_layers(layers, n_layers: int | None) -> list[int]:
    layers = [int(x) for x in layers]
    if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0:
        raise ValueError(f"layers {layers} must be distinct model layers >= 0 in increasing order")
    if n_layers is not None and layers[-1] >= n_layers:
        raise ValueError(f"layer {layers[-1]} is outside a model of n_layers={n_layers}")
    return layers


def _check_params(params: dict, n: int, kind: str) -> tuple[int, int]:
    """(d, F) of a CLT's or crosscoder's params to write, checked as ``check_tensors`` does."""
    what = f"{kind} params to write (n={n} layers)"
    d, width = tensor_shape(params, "W_enc", what, "[n, d, F]")[1:]
    per = (n,) if kind == "CLT" else ()
    expected = {"W_enc": (n, d, width), "b_enc": per + (width,), "threshold": per + (width,), "b_dec": (n, d),
                "W_dec": (n, width, n, d) if kind == "CLT" else (width, n, d)}
    check_tensors(params, expected | ({"W_skip": (n, d, d)} if kind == "CLT" and "W_skip" in params else {}),
                  what, f"d={d}, F={width} from 'W_enc'")
    return d, width


def _layer_files(path: pathlib.Path) -> dict[int, pathlib.Path]:
    if not path.is_dir():
        raise FileNotFoundError(f"no CLT or crosscoder directory at {path}")
    files = {int(m.group(1)): p for p in path.iterdir() if (m := LAYER_FILE_RE.fullmatch(p.name))}
    if not files:
        raise FileNotFoundError(f"{path} holds no params_layer_<i>.safetensors")
    return files


def _read_config(path: pathlib.Path) -> dict:
    return read_json(path / GS2_CONFIG_FILE) if (path / GS2_CONFIG_FILE).is_file() else {}


def _check_config(config: dict, path: pathlib.Path, **values) -> None:
    if "width_per_layer" not in config:  # not ours: GS2's "width" may be a rounded name ("262k" of 262,080)
        values.pop("width")
    for key, value in (values | {"architecture": "jump_relu"}).items():
        if key in config and config[key] != value:
            raise ValueError(f"{path / GS2_CONFIG_FILE}: {key!r} is {config[key]!r}; expected {value!r} as the "
                             "params files have")


def _layers_from_name(name: str) -> list[int] | None:
    match = re.match(r"layer_(\d+(?:_\d+)*)_width_", name)
    return [int(x) for x in match.group(1).split("_")] if match else None


def _save(file: pathlib.Path, tensors: dict) -> None:
    with atomic_path(file) as tmp:
        safetensors.numpy.save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, tmp)


def _config(kind: str, metadata: dict | None, *, width, width_per_layer, layers, n_layers, d_model, l0, average_l0,
            affine, encoder, kinds) -> dict:
    config = {"hf_hook_point_in": HF_HOOK_POINTS[kinds[0]].format("{layer}"),
              "hf_hook_point_out": HF_HOOK_POINTS[kinds[1]].format("{layer}"), "width": width,
              "model_name": (metadata or {}).get("model_name"), "architecture": "jump_relu", "l0": l0,
              "affine_connection": affine, "type": kind, "layers": layers, "d_model": d_model,
              "width_per_layer": width_per_layer, "average_l0": average_l0, "encoder": encoder}
    config |= {"n_layers": n_layers} if n_layers is not None else {}
    clash = sorted(set(metadata or {}) & (set(config) - {"model_name"}))
    if clash:
        raise ValueError(f"metadata keys {clash} would overwrite the config.json keys the layout defines")
    return config | json_ready(dict(metadata or {}))


def _write_config(out: pathlib.Path, config: dict) -> None:
    with atomic_path(out / GS2_CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2))
