"""Activation sites of a Gemma decoder, named as in Gemma Scope (arXiv 2408.05147, §3.1, Fig. 1).

A Gemma 2/3 block computes ``a = post_attention_norm(attn(pre_attention_norm(x))); h = x + a;
m = post_ffw_norm(mlp(pre_ffw_norm(h))); out = h + m``. Its sites, layers zero-based:

- ``res``: the block output ``out`` (residual stream after the block), ``d_model`` wide;
- ``att``: per-head attention outputs concatenated over heads, before the output projection W_O,
  ``num_heads * head_dim`` wide;
- ``mlp``: ``m``, the MLP output after post_ffw_norm and before the residual add, ``d_model`` wide;
- ``mlp_in``: ``pre_ffw_norm(h)``, the MLP's input, ``d_model`` wide (Hugging Face
  ``model.layers.L.pre_feedforward_layernorm.output``): what a transcoder reads to predict ``mlp``
  (Gemma Scope 2; GS1 has no SAEs here).

A site is written ``"<kind>.<layer>"`` (``"res.12"``). A spec lists sites separated by commas, and ``*`` stands for
every layer: ``"res.*"``, ``"res.3,att.3,mlp.3"``, ``"mlp.0-5"``. A transcoder of layer L reads ``mlp_in.L`` and
predicts ``mlp.L``; a transcoder spec lists layers in the same forms (``"4,8,12"``, ``"*"``, ``"0-5"``).
"""

from __future__ import annotations

import dataclasses

KINDS = ("res", "att", "mlp", "mlp_in")
# Name of activations not tied to a model site (a source's site name; released under ``custom/layer_0``).
CUSTOM = "custom"
# The kinds a transcoder of layer L reads and predicts: mlp_in.L -> mlp.L (the one place that pairs them).
_TRANSCODER_KINDS = ("mlp_in", "mlp")


@dataclasses.dataclass(frozen=True, order=True)
class Site:
    """One activation site: ``kind`` in ``KINDS`` and a zero-based ``layer``.

    Raises:
      ValueError: unknown kind or negative layer.
    """

    kind: str
    layer: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; expected one of {KINDS}")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"site layer must be an integer >= 0, got {self.layer!r}")

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    @classmethod
    def parse(cls, text: str) -> "Site":
        """Parses ``"res.12"``. Raises ValueError naming the expected form."""
        kind, sep, layer = text.strip().partition(".")
        if not sep or not layer.isdigit():
            raise ValueError(f"bad site {text!r}; expected '<kind>.<layer>' such as 'res.12' with kind in {KINDS}")
        return cls(kind, int(layer))


def parse_sites(spec: str, num_layers: int) -> list[Site]:
    """Expands a site spec (module docstring) into sorted, unique sites of a model with ``num_layers`` layers.

    Raises:
      ValueError: a malformed entry, an empty spec, or a layer outside ``[0, num_layers)``.
    """
    sites = set()
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        kind, sep, layers = entry.partition(".")
        if not sep:
            raise ValueError(f"bad site {entry!r} in {spec!r}; expected '<kind>.<layer>', '<kind>.*' or '<kind>.<a>-<b>'")
        if layers == "*":
            chosen = range(num_layers)
        elif "-" in layers:
            first, _, last = layers.partition("-")
            if not (first.isdigit() and last.isdigit()):
                raise ValueError(f"bad layer range {entry!r} in {spec!r}; expected e.g. 'res.0-5'")
            chosen = range(int(first), int(last) + 1)
        else:
            chosen = [Site.parse(entry).layer]
        for layer in chosen:
            if not 0 <= layer < num_layers:
                raise ValueError(f"site {kind}.{layer} is outside the model's layers 0..{num_layers - 1}")
            sites.add(Site(kind, layer))
    if not sites:
        raise ValueError(f"site spec {spec!r} names no site")
    return sorted(sites)


def release_site(name: str) -> Site | None:
    """The model site a source's site name denotes (``"res.12"``), or None for ``CUSTOM`` activations.

    Raises:
      ValueError: a malformed name (``Site.parse``).
    """
    return None if name == CUSTOM else Site.parse(name)


def transcoder_spec(layers: str) -> str:
    """The site spec the transcoders of a layer spec read and predict: ``"4,8"`` -> ``"mlp_in.4,mlp.4,mlp_in.8,mlp.8"``
    (``"*"`` and ``"a-b"`` as in site specs; ``""`` -> ``""``)."""
    return ",".join(f"{kind}.{entry.strip()}" for entry in layers.split(",") if entry.strip()
                    for kind in _TRANSCODER_KINDS)


def crosscoder_spec(layers: str) -> str:
    """The site spec a crosscoder over a layer spec reads and reconstructs: ``"5,9"`` -> ``"res.5,res.9"``
    (``"*"`` and ``"a-b"`` as in site specs; ``""`` -> ``""``)."""
    return ",".join(f"res.{entry.strip()}" for entry in layers.split(",") if entry.strip())


def transcoder_inputs(layers: str, num_layers: int) -> list[Site]:
    """The sorted ``mlp_in.L`` sites the transcoders of a layer spec read, in a model of ``num_layers`` layers.

    Raises:
      ValueError: as ``parse_sites``.
    """
    return [s for s in parse_sites(transcoder_spec(layers), num_layers) if s.kind == _TRANSCODER_KINDS[0]]


def transcoder_pair(layer: int) -> tuple[Site, Site]:
    """``(site read, site predicted)`` of the transcoder of ``layer``: ``(mlp_in.L, mlp.L)``."""
    site_in, site_out = _TRANSCODER_KINDS
    return Site(site_in, layer), Site(site_out, layer)


def transcoder_target(site: Site) -> Site:
    """The site a transcoder reading ``site`` (``mlp_in.L``) predicts: ``mlp.L``.

    Raises:
      ValueError: ``site`` is not an ``mlp_in`` site.
    """
    site_in, site_out = transcoder_pair(site.layer)
    if site != site_in:
        raise ValueError(f"a transcoder reads an {site_in.kind} site, got {site}")
    return site_out


def transcoder_label(site: Site, skip: bool) -> str:
    """How metrics and reports name the transcoder reading ``site``: ``"mlp_in.4→mlp.4"``, plus ``" +skip"`` with
    an affine skip connection."""
    return f"{site}→{transcoder_target(site)}" + (" +skip" if skip else "")
