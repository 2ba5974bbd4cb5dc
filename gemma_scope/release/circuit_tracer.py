"""circuit-tracer's native layouts (PyPI ``circuit-tracer`` 0.5.0, ``transcoder/cross_layer_transcoder.py``
``to_safetensors`` / ``load_clt`` and ``single_layer_transcoder.py``'s ``TranscoderSet``; ``utils/caching.py``'s
``config.yaml``), written and read back, for the params of ``gemma_scope.sae.crosslayer`` (float32, raw).

**CLT** (``model_kind: cross_layer_transcoder``), one directory, every model layer i = 0..n_layers−1 covered:

    W_enc_{i}.safetensors   W_enc_{i} [F, d] (= our W_enc[i].T), b_enc_{i} [F], b_dec_{i} [d], threshold_{i} [F]
    W_dec_{i}.safetensors   W_dec_{i} [F, n_layers − i, d]   (= our W_dec[i, :, i:], the triangle only)
    W_skip.safetensors      W_skip [n_layers, d, d], applied ``x_i @ W_skip[i]`` (circuit-tracer's CLT parameter;
                            its writer and ``load_clt`` drop it, so it lives in this sidecar: load it with
                            ``clt.W_skip = torch.nn.Parameter(safetensors.torch.load_file(path)["W_skip"])``)
    config.yaml             model_kind, model_name, feature_input_hook, feature_output_hook

A CLT without ``threshold_{i}`` is a ReLU CLT; it reads as JumpReLU with threshold 0 (the same function).

**Transcoder set** (``model_kind: transcoder_set``): ``layer_{i}.safetensors`` per layer with ``W_enc [F, d]``,
``W_dec [F, d]``, ``b_enc [F]``, ``b_dec [d]``, ``activation_function.threshold [F]`` and optional ``W_skip
[d, d]`` stored TRANSPOSED (circuit-tracer's single-layer transcoder computes ``x @ W_skip.T``). It is read as a
CLT with zero cross-layer decoders (``W_dec[i, :, j ≠ i] = 0``), which is what it is, and only such a CLT writes
as one.

Hook names (config.yaml) are circuit-tracer's: for Gemma 3 ``mlp.hook_in`` (the pre-feed-forward norm's output,
our ``mlp_in``) and ``hook_mlp_out`` (the post-feed-forward norm's output, our ``mlp``), its nnsight mapping
for ``Gemma3ForCausalLM``; TransformerLens backends use ``ln2.hook_normalized`` for the input.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import safetensors.numpy
import yaml

from gemma_scope.files import atomic_path
from gemma_scope.release.params import check_tensors, read_safetensors, tensor_shape

CONFIG_FILE = "config.yaml"
SKIP_FILE = "W_skip.safetensors"
CLT_KIND, SET_KIND = "cross_layer_transcoder", "transcoder_set"
INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "hook_mlp_out"
THRESHOLD = "activation_function.threshold"


def is_circuit_tracer_dir(path: pathlib.Path) -> bool:
    """Whether ``path`` is a directory with circuit-tracer's ``config.yaml`` and a CLT's or set's first file."""
    return (path / CONFIG_FILE).is_file() and any((path / n).is_file() for n in ("W_enc_0.safetensors",
                                                                               "layer_0.safetensors"))


def circuit_tracer_layers(path: pathlib.Path) -> list[int]:
    """The layers 0..n−1 of a circuit-tracer directory, from its file names alone (no tensor is read).

    Raises:
      FileNotFoundError / ValueError: as ``read_circuit_tracer`` for its config.yaml.
    """
    first = _layer_file_pattern(path)
    n = 0
    while (path / first.format(n)).is_file():
        n += 1
    return list(range(n))


def write_circuit_tracer(out: str | os.PathLike, params: dict, *, model_name: str, kind: str = CLT_KIND,
                         feature_input_hook: str = INPUT_HOOK, feature_output_hook: str = OUTPUT_HOOK) -> pathlib.Path:
    """Writes a CLT of EVERY layer of its model in circuit-tracer's layout (module docstring); returns ``out``.

    Args:
      out: the directory (created).
      params: ``crosslayer``'s CLT params covering layers 0..n−1 (n = the model's layer count), float32.
      model_name: config.yaml's ``model_name`` (circuit-tracer's ReplacementModel loads it, e.g.
        "google/gemma-3-270m").
      kind: ``"cross_layer_transcoder"`` or ``"transcoder_set"`` (then ``W_dec[i, :, j ≠ i]`` must be zero).
      feature_input_hook, feature_output_hook: config.yaml's hook names.

    Raises:
      ValueError: params not of a CLT's shapes, or a transcoder set asked of a CLT with cross-layer decoders.
    """
    p = {k: np.asarray(v, np.float32) for k, v in params.items()}
    n, d, width = tensor_shape(p, "W_enc", "CLT params to write", "[n, d, F]")
    check_tensors(p, {"W_enc": (n, d, width), "b_enc": (n, width), "threshold": (n, width), "W_dec": (n, width, n, d),
                      "b_dec": (n, d)} | ({"W_skip": (n, d, d)} if "W_skip" in p else {}), "CLT params to write",
                  f"n={n}, d={d}, F={width} from 'W_enc'")
    out = pathlib.Path(out)
    if kind == CLT_KIND:
        for i in range(n):
            _save(out / f"W_enc_{i}.safetensors", {f"W_enc_{i}": p["W_enc"][i].T, f"b_enc_{i}": p["b_enc"][i],
                                                    f"b_dec_{i}": p["b_dec"][i], f"threshold_{i}": p["threshold"][i]})
            _save(out / f"W_dec_{i}.safetensors", {f"W_dec_{i}": p["W_dec"][i, :, i:]})
        if "W_skip" in p:
            _save(out / SKIP_FILE, {"W_skip": p["W_skip"]})
    elif kind == SET_KIND:
        off = p["W_dec"] * (1 - np.eye(n, dtype=np.float32))[:, None, :, None]
        if off.any():
            raise ValueError(f"a transcoder set has no cross-layer decoders; this CLT's W_dec[i, :, j ≠ i] holds "
                             f"{int(np.count_nonzero(off))} non-zero entries (write it as a {CLT_KIND})")
        for i in range(n):
            _save(out / f"layer_{i}.safetensors", {"W_enc": p["W_enc"][i].T, "W_dec": p["W_dec"][i, :, i],
                                                   "b_enc": p["b_enc"][i], "b_dec": p["b_dec"][i],
                                                   THRESHOLD: p["threshold"][i]}
                  | ({"W_skip": p["W_skip"][i].T} if "W_skip" in p else {}))
    else:
        raise ValueError(f"kind is {kind!r}; expected {CLT_KIND!r} or {SET_KIND!r}")
    config = {"model_kind": kind, "model_name": model_name, "feature_input_hook": feature_input_hook,
              "feature_output_hook": feature_output_hook}
    with atomic_path(out / CONFIG_FILE) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def read_circuit_tracer(path: str | os.PathLike, *, n_layers: int | None = None) -> tuple[dict, dict]:
    """Reads a circuit-tracer CLT or transcoder-set directory into ``crosslayer``'s CLT params (float32).

    Args:
      path: the directory (``config.yaml`` and the layer files).
      n_layers: the model's layer count when known: the files must number exactly that many.

    Returns:
      (params, info): info ``{"kind": "clt", "format": model_kind, "layers": [0..n−1], "n_layers", "d_model",
      "width", "affine", "average_l0": None, "model_name", "config"}``.

    Raises:
      FileNotFoundError: no config.yaml, or a layer file missing (named).
      ValueError: one line naming the file, the key and the expected shape (``W_dec_{i}`` must be
        ``[F, n_layers − i, d]``); a config.yaml that is not YAML or names another model_kind; a layer count other
        than ``n_layers``.
    """
    path = pathlib.Path(path)
    config, first = _read_config(path), _layer_file_pattern(path)
    kind, n = config["model_kind"], len(circuit_tracer_layers(path))
    if n == 0 or (n_layers is not None and n != n_layers):
        raise ValueError(f"{path}: {n} files {first.format('<i>')} numbered from 0; expected {n_layers or 'some'}, "
                         "one per model layer")
    params = _read_clt(path, n) if kind == CLT_KIND else _read_set(path, n)
    info = {"kind": "clt", "format": kind, "layers": list(range(n)), "n_layers": n,
            "d_model": params["W_enc"].shape[1], "width": params["W_enc"].shape[2], "affine": "W_skip" in params,
            "average_l0": None, "model_name": config.get("model_name"), "config": config}
    return params, info


def _read_clt(path: pathlib.Path, n: int) -> dict:
    raws = [read_safetensors(path / f"W_enc_{i}.safetensors") for i in range(n)]
    width, d = tensor_shape(raws[0], "W_enc_0", path / "W_enc_0.safetensors", "[F, d_model]")
    jump = "threshold_0" in raws[0]
    w_dec = np.zeros((n, width, n, d), np.float32)
    for i, raw in enumerate(raws):
        file = path / f"W_enc_{i}.safetensors"
        check_tensors(raw, {f"W_enc_{i}": (width, d), f"b_enc_{i}": (width,), f"b_dec_{i}": (d,)}
                      | ({f"threshold_{i}": (width,)} if jump else {}), file, f"F={width}, d={d} from W_enc_0")
        dec_file = path / f"W_dec_{i}.safetensors"
        if not dec_file.is_file():
            raise FileNotFoundError(f"{dec_file} is missing; expected W_dec_{i} [{width}, {n - i}, {d}]")
        dec = read_safetensors(dec_file)
        check_tensors(dec, {f"W_dec_{i}": (width, n - i, d)}, dec_file, f"F={width}, d={d} from W_enc_0, "
                      f"n_layers={n} W_enc files, source layer {i}")
        w_dec[i, :, i:] = dec[f"W_dec_{i}"]
    stack = lambda key: np.stack([raw[key.format(i)].astype(np.float32) for i, raw in enumerate(raws)])  # noqa: E731
    params = {"W_enc": np.swapaxes(stack("W_enc_{}"), 1, 2), "b_enc": stack("b_enc_{}"), "W_dec": w_dec,
              "threshold": stack("threshold_{}") if jump else np.zeros((n, width), np.float32),
              "b_dec": stack("b_dec_{}")}
    if (path / SKIP_FILE).is_file():
        skip = read_safetensors(path / SKIP_FILE)
        check_tensors(skip, {"W_skip": (n, d, d)}, path / SKIP_FILE, f"n_layers={n}, d={d}")
        params["W_skip"] = skip["W_skip"].astype(np.float32)
    return params


def _read_set(path: pathlib.Path, n: int) -> dict:
    raws = [read_safetensors(path / f"layer_{i}.safetensors") for i in range(n)]
    width, d = tensor_shape(raws[0], "W_enc", path / "layer_0.safetensors", "[F, d_model]")
    skip = "W_skip" in raws[0]
    for i, raw in enumerate(raws):
        check_tensors(raw, {"W_enc": (width, d), "W_dec": (width, d), "b_enc": (width,), "b_dec": (d,),
                            THRESHOLD: (width,)} | ({"W_skip": (d, d)} if skip else {}),
                      path / f"layer_{i}.safetensors", f"F={width}, d={d} from layer_0.safetensors")
    stack = lambda key: np.stack([raw[key].astype(np.float32) for raw in raws])  # noqa: E731
    w_dec = np.zeros((n, width, n, d), np.float32)
    for i, raw in enumerate(raws):
        w_dec[i, :, i] = raw["W_dec"]
    params = {"W_enc": np.swapaxes(stack("W_enc"), 1, 2), "b_enc": stack("b_enc"), "threshold": stack(THRESHOLD),
              "W_dec": w_dec, "b_dec": stack("b_dec")}
    if skip:
        params["W_skip"] = np.swapaxes(stack("W_skip"), 1, 2)
    return params


def _layer_file_pattern(path: pathlib.Path) -> str:
    kind = _read_config(path).get("model_kind")
    first = {CLT_KIND: "W_enc_{}.safetensors", SET_KIND: "layer_{}.safetensors"}.get(kind)
    if first is None:
        raise ValueError(f"{path / CONFIG_FILE}: 'model_kind' is {kind!r}; expected {CLT_KIND!r} or {SET_KIND!r}")
    return first


def _read_config(path: pathlib.Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; a circuit-tracer transcoder directory holds one")
    try:
        config = yaml.safe_load(file.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ValueError(f"{file}: not valid YAML ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a YAML mapping with 'model_kind', got {type(config).__name__}")
    return config


def _save(file: pathlib.Path, tensors: dict) -> None:
    with atomic_path(file) as tmp:
        safetensors.numpy.save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, tmp)
