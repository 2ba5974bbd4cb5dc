"""Architecture configs of the Gemma 2 and Gemma 3 text decoders.

The numbers are those of the published configs (Google's `gemma` library, `gm.nn.Gemma2_2B` … `Gemma3_1B`, and the
Hugging Face `config.json` files of the same checkpoints). Two tiny configs exercise every feature in tests.
"""

from __future__ import annotations

import dataclasses

LOCAL = "local"  # sliding-window attention
GLOBAL = "global"  # full causal attention


@dataclasses.dataclass(frozen=True)
class Config:
    """A Gemma decoder's architecture (hashable, so it can be a static argument of `jax.jit`).

    Attributes:
      name: registry name, e.g. "gemma3_270m".
      vocab_size: rows of the (tied) embedding table.
      d_model: width of the residual stream.
      num_heads, num_kv_heads, head_dim: query heads, key/value heads (GQA when fewer), per-head width.
      hidden_dim: width of the GeGLU MLP.
      attention_types: one of LOCAL / GLOBAL per layer; its length is the number of layers.
      sliding_window: a LOCAL layer's query at position p sees keys at positions in (p - sliding_window, p].
      local_rope_base, global_rope_base: RoPE base frequency of LOCAL / GLOBAL layers.
      global_rope_scale: RoPE positional-interpolation factor of GLOBAL layers (1 = none).
      query_scale: the factor queries are multiplied by before q·k (1/sqrt(head_dim), except Gemma 2 27B:
        1/sqrt(d_model / num_heads)).
      attn_logit_softcap, final_logit_softcap: c in c·tanh(x / c) on attention / output logits, or None.
      use_qk_norm: RMSNorm on queries and keys (Gemma 3).
      transpose_gating_einsum: the MLP gating weight is stored [2, hidden_dim, d_model] instead of
        [2, d_model, hidden_dim] (as in the `gemma` library's checkpoints of Gemma 2 9B/27B and Gemma 3).
      norm_eps: RMSNorm epsilon.
    """

    name: str
    vocab_size: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_dim: int
    attention_types: tuple[str, ...]
    sliding_window: int
    local_rope_base: float = 10_000.0
    global_rope_base: float = 10_000.0
    global_rope_scale: float = 1.0
    query_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    use_qk_norm: bool = False
    transpose_gating_einsum: bool = False
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        bad = [t for t in self.attention_types if t not in (LOCAL, GLOBAL)]
        if bad or not self.attention_types:
            raise ValueError(f"attention_types must be a non-empty tuple of {LOCAL!r}/{GLOBAL!r}, got {self.attention_types!r}")
        if self.query_scale is None:
            object.__setattr__(self, "query_scale", self.head_dim**-0.5)

    @property
    def num_layers(self) -> int:
        return len(self.attention_types)

    @property
    def use_qkv_einsum(self) -> bool:
        """The `gemma` library fuses q, k, v into one `qkv_einsum` weight when there is no GQA/MQA."""
        return self.num_kv_heads == self.num_heads

    def site_width(self, kind: str) -> int:
        """Width of a site's activations: ``num_heads * head_dim`` for "att", ``d_model`` for "res"/"mlp"/"mlp_in"."""
        if kind == "att":
            return self.num_heads * self.head_dim
        if kind in ("res", "mlp", "mlp_in"):
            return self.d_model
        raise ValueError(f"unknown site kind {kind!r}; expected 'res', 'att', 'mlp' or 'mlp_in'")

    def check_site(self, site, width: int | None = None, what: str = "activation") -> None:
        """Checks that ``site`` (a `gemma_scope.sites.Site`) is one of this model's and, given ``width``, that its
        activations are ``width`` wide.

        Raises:
          ValueError: a layer outside ``[0, num_layers)``, or another width (``what`` names whose, e.g. "SAE
            input").
        """
        if not 0 <= site.layer < self.num_layers:
            raise ValueError(f"site {site} is beyond {self.name}'s layers 0..{self.num_layers - 1}")
        if width is not None and width != self.site_width(site.kind):
            raise ValueError(f"{what} width {width} does not match site {site} of {self.name} "
                             f"(width {self.site_width(site.kind)})")


def _pattern(pattern: tuple[str, ...], num_layers: int) -> tuple[str, ...]:
    return tuple(pattern[i % len(pattern)] for i in range(num_layers))


_GEMMA2 = (LOCAL, GLOBAL)  # alternating, starting local
_GEMMA3 = (LOCAL,) * 5 + (GLOBAL,)  # 5 local : 1 global


def _gemma2(name, d_model, num_layers, num_heads, num_kv_heads, head_dim, hidden_dim, **kw) -> Config:
    kw = {"vocab_size": 256_000, "sliding_window": 4096, **kw}
    return Config(name=name, d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                  hidden_dim=hidden_dim, attention_types=_pattern(_GEMMA2, num_layers), attn_logit_softcap=50.0,
                  final_logit_softcap=30.0, **kw)


def _gemma3(name, d_model, num_layers, num_heads, num_kv_heads, head_dim, hidden_dim, **kw) -> Config:
    kw = {"vocab_size": 262_144, "sliding_window": 512, **kw}
    return Config(name=name, d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                  hidden_dim=hidden_dim, attention_types=_pattern(_GEMMA3, num_layers), local_rope_base=10_000.0,
                  global_rope_base=1_000_000.0, use_qk_norm=True, transpose_gating_einsum=True, **kw)


_CONFIGS = {
    c.name: c
    for c in (
        _gemma2("gemma2_2b", 2304, 26, 8, 4, 256, 9216),
        _gemma2("gemma2_9b", 3584, 42, 16, 8, 256, 14336, transpose_gating_einsum=True),
        _gemma2("gemma2_27b", 4608, 46, 32, 16, 128, 36864, transpose_gating_einsum=True,
                query_scale=(4608 // 32) ** -0.5),
        _gemma3("gemma3_270m", 640, 18, 4, 1, 256, 2048),
        _gemma3("gemma3_1b", 1152, 26, 4, 1, 256, 6912),
        # Tiny random-weight configs for tests: GQA, a sliding window shorter than test sequences, softcaps.
        _gemma2("gemma2_tiny", 64, 4, 4, 2, 16, 128, vocab_size=512, sliding_window=8),
        _gemma3("gemma3_tiny", 64, 7, 4, 2, 16, 128, vocab_size=512, sliding_window=8),
    )
}


def config_names() -> list[str]:
    """Names accepted by `get_config`."""
    return sorted(_CONFIGS)


def get_config(name: str) -> Config:
    """The architecture config called ``name`` (see `config_names`).

    Raises:
      ValueError: unknown name (the message lists the known ones).
    """
    try:
        return _CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; expected one of {config_names()}") from None
