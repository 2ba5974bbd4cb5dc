"""Gemma 2 / Gemma 3 params from a Hugging Face-layout directory (config.json + *.safetensors), mapped to the
`gemma` library's tree. HF Gemma norms already store ``scale`` of x·(1 + scale); matrices are (out, in)."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from gemma_scope.model import config as configs
from gemma_scope.model.config import GLOBAL, LOCAL, Config
from gemma_scope.model.params import check_params

_FAMILIES = ("gemma2", "gemma3_text", "gemma3")


def _attention_types(hf: dict, family: str) -> tuple[str, ...]:
    n = hf["num_hidden_layers"]
    if "layer_types" in hf and hf["layer_types"]:
        kinds = {"sliding_attention": LOCAL, "full_attention": GLOBAL}
        return tuple(kinds[t] for t in hf["layer_types"])
    if family == "gemma2":  # even layers slide
        return tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(n))
    period = hf.get("sliding_window_pattern", 6)
    return tuple(GLOBAL if (i + 1) % period == 0 else LOCAL for i in range(n))


def _rope(hf: dict, gemma3: bool, source: str) -> tuple[float, float, float]:
    """(local base, global base, global linear scale) from transformers 5's ``rope_parameters`` or 4's fields."""
    params = hf.get("rope_parameters")
    if params:
        full = params.get("full_attention", params)
        local = params.get("sliding_attention", full)
    else:
        full = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 10_000.0)}
        local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0) if gemma3 else full["rope_theta"]}
    kinds = [p.get("rope_type", p.get("type", "default")) for p in (local, full)]
    if kinds[0] != "default" or kinds[1] not in ("default", "linear"):
        raise ValueError(f"{source}: RoPE types {kinds} (sliding, full) are not supported; expected default RoPE, "
                         "optionally linear scaling on full-attention layers")
    return float(local["rope_theta"]), float(full["rope_theta"]), float(full.get("factor", 1.0))


def config_from_hf(hf: dict, source: str) -> Config:
    """Our `Config` from a Hugging Face Gemma 2/3 ``config.json`` dict.

    A known architecture (same family, d_model and depth as a `get_config` name) gets that config's
    ``transpose_gating_einsum`` layout; others get Gemma 3's layout for Gemma 3 and the 2B layout for Gemma 2.

    Raises:
      ValueError: not a Gemma 2/3 config, an unsupported activation or RoPE scaling.
    """
    family = hf.get("model_type")
    if family == "gemma3" and "text_config" in hf:
        hf, family = hf["text_config"], "gemma3_text"
    if family not in _FAMILIES:
        raise ValueError(f"{source}: model_type {family!r} is not supported; expected one of {_FAMILIES}")
    gemma3 = family != "gemma2"
    act = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"{source}: hidden_activation {act!r} is not supported; expected 'gelu_pytorch_tanh'")
    local_base, global_base, global_scale = _rope(hf, gemma3, source)
    d_model, num_layers = hf["hidden_size"], hf["num_hidden_layers"]
    known = [c for c in map(configs.get_config, configs.config_names())
             if c.d_model == d_model and c.num_layers == num_layers and c.use_qk_norm == gemma3]
    return Config(
        name=f"{family}:{pathlib.Path(source).name}",
        vocab_size=hf["vocab_size"], d_model=d_model, num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"], hidden_dim=hf["intermediate_size"],
        attention_types=_attention_types(hf, family), sliding_window=hf["sliding_window"],
        local_rope_base=local_base, global_rope_base=global_base, global_rope_scale=global_scale,
        query_scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
        attn_logit_softcap=hf.get("attn_logit_softcapping"), final_logit_softcap=hf.get("final_logit_softcapping"),
        use_qk_norm=gemma3, transpose_gating_einsum=known[0].transpose_gating_einsum if known else gemma3,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    )


def _strip(name: str) -> str | None:
    """HF tensor name -> name relative to the text model ("layers.3.mlp.up_proj.weight"), None for others."""
    if "vision" in name or "multi_modal" in name:
        return None
    for prefix in ("model.language_model.", "language_model.model.", "model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def read_hf(directory: str | pathlib.Path, dtype=np.float32) -> tuple[Config, dict]:
    """(config, params) from a local HF Gemma 2/3 directory; params are numpy arrays of ``dtype``.

    Raises:
      FileNotFoundError: no config.json or no *.safetensors in ``directory``.
      ValueError: unsupported config, or tensors missing / mis-shaped (the message names them).
    """
    from safetensors.numpy import load_file

    directory = pathlib.Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; expected a Hugging Face model directory")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} has no *.safetensors weight files")
    cfg = config_from_hf(json.loads(config_file.read_text()), str(directory))
    tensors = {}
    for file in files:
        for name, value in load_file(file).items():
            if (short := _strip(name)) is not None:
                tensors[short] = value

    def get(name):
        if name not in tensors:
            raise ValueError(f"{directory}: tensor {name!r} is missing from the safetensors files")
        return np.asarray(tensors[name], dtype)

    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model

    def heads_in(w, count):  # (count*h, d) -> (count, d, h)
        return w.reshape(count, h, d).transpose(0, 2, 1)

    params = {"embedder": {"input_embedding": get("embed_tokens.weight")}, "final_norm": {"scale": get("norm.weight")}}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        q, kk, v = (heads_in(get(p + f"self_attn.{x}_proj.weight"), c) for x, c in (("q", n), ("k", k), ("v", k)))
        attn = {"qkv_einsum": {"w": np.stack([q, kk, v])}} if cfg.use_qkv_einsum else {
            "q_einsum": {"w": q}, "kv_einsum": {"w": np.stack([kk, v])}}
        attn["attn_vec_einsum"] = {"w": get(p + "self_attn.o_proj.weight").T.reshape(n, h, d)}
        if cfg.use_qk_norm:
            attn["_query_norm"] = {"scale": get(p + "self_attn.q_norm.weight")}
            attn["_key_norm"] = {"scale": get(p + "self_attn.k_norm.weight")}
        gate, up = get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")  # (hidden, d)
        gating = np.stack([gate, up]) if cfg.transpose_gating_einsum else np.stack([gate.T, up.T])
        params[f"layer_{i}"] = {
            "pre_attention_norm": {"scale": get(p + "input_layernorm.weight")},
            "post_attention_norm": {"scale": get(p + "post_attention_layernorm.weight")},
            "pre_ffw_norm": {"scale": get(p + "pre_feedforward_layernorm.weight")},
            "post_ffw_norm": {"scale": get(p + "post_feedforward_layernorm.weight")},
            "attn": attn,
            "mlp": {"gating_einsum": gating, "linear": get(p + "mlp.down_proj.weight").T},
        }
    check_params(params, cfg, str(directory))
    return cfg, params

