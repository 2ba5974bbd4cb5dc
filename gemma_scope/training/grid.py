"""The grid a run trains: which SAE or transcoder reads which site and predicts which, at which λ or target L0,
with or without an affine skip, and where it lives in the stacked params (Gemma Scope §3; transcoders as in Gemma
Scope 2). Built once from the config and the activation source (``Grid.build``); the step, the metrics log and the
release read it, and no other module works out which SAE is which.

Words:
  stack: SAEs whose params are stacked in one array ``[n, ...]``, the key of their params, state, step batch and
    metrics. An SAE stack holds the sites of one input width (``"d<width>"``); a transcoder stack the transcoders
    of the config's layers with one skip variant (``"tc_d<width>"``, ``"tc_skip_d<width>"``).
  row: one site of a stack: its index in the stack's batch ``[n_sites, B, d]`` and constants ``[n_sites, ...]``.
    A transcoder's row reads ``mlp_in.L`` and predicts ``mlp.L`` (``sites.transcoder_target``).
  SAE: one entry of a stack, an SAE or a transcoder (``SAE``, its identity).
  group: used only for the activation source's arrays of same-width sites (``source.groups``), from which the
    stacks' batches and constants are gathered.

A stack is site-major: with ``n_sweep`` sweep entries, SAE ``i`` reads row ``i // n_sweep`` and uses sweep entry
``i % n_sweep`` (``Stack.sae``); a cross-layer stack's entry ``i`` reads every row and is sweep entry ``i``.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from gemma_scope import mesh as mesh_lib
from gemma_scope.activations import group_sites
from gemma_scope.sites import (
    Site,
    crosscoder_spec,
    parse_sites,
    release_site,
    transcoder_inputs,
    transcoder_label,
    transcoder_spec,
    transcoder_target,
)

CROSSLAYER_KINDS = ("clt", "crosscoder")  # Stack.crosslayer: a CLT reads mlp_in.L → mlp.L, a crosscoder res.L


@dataclasses.dataclass(frozen=True)
class Stack:
    """The SAEs of one stack: the ``sites`` it reads (``n_sites`` rows of width ``d_model``) × a sweep of
    ``len(l0_coefficients)`` SAEs each, all ``width`` latents wide. Sweep entry ``j`` uses λ ``l0_coefficients[j]``
    and, with ``sparsity_loss="target_l0"``, the target L0 ``target_l0s[j]`` (``target_l0s`` is then as long as
    ``l0_coefficients``; empty otherwise). A transcoder stack holds transcoders (``mlp_in.L`` → ``mlp.L``,
    d_model both) with an affine skip connection or without. A cross-layer stack (``crosslayer`` "clt", a
    transcoder stack over its layers, or "crosscoder", an SAE stack over its ``res`` sites) trains one dictionary
    per sweep entry over all its sites; a CLT's sparsity acts on each layer's L0 (``l0_per_layer``, the target
    L0 per layer) or on their sum (the target the total).

    Raises:
      ValueError: ``skip`` without ``transcoder``; an unknown ``crosslayer``, or a CLT that is not a transcoder
        stack, or a crosscoder that is.
    """

    sites: tuple[str, ...]
    d_model: int
    width: int
    l0_coefficients: tuple[float, ...]
    target_l0s: tuple[float, ...] = ()
    transcoder: bool = False
    skip: bool = False
    crosslayer: str = ""
    l0_per_layer: bool = True

    def __post_init__(self):
        if self.skip and not self.transcoder:
            raise ValueError("an affine skip connection (skip=True) belongs to transcoder stacks only")
        if self.crosslayer and (self.crosslayer not in CROSSLAYER_KINDS
                                or self.transcoder != (self.crosslayer == "clt")):
            raise ValueError(f"crosslayer must be '' or one of {CROSSLAYER_KINDS} (a CLT a transcoder stack, a "
                             f"crosscoder not), got {self.crosslayer!r} with transcoder={self.transcoder}")

    @property
    def n_sites(self) -> int:
        return len(self.sites)

    @property
    def n(self) -> int:
        """The number of SAEs (of cross-layer dictionaries): the stacked params' leading axis."""
        return (1 if self.crosslayer else self.n_sites) * len(self.l0_coefficients)

    @property
    def sites_out(self) -> tuple[str, ...]:
        """The site each row predicts: its own for an SAE, ``mlp.L`` of a transcoder's ``mlp_in.L``."""
        if not self.transcoder:
            return self.sites
        return tuple(str(transcoder_target(Site.parse(s))) for s in self.sites)

    def sae(self, i: int) -> tuple[int | None, float, float | None]:
        """``(row, λ, target L0 or None)`` of SAE ``i`` of the stacked params (site-major: module docstring); row
        None for a cross-layer dictionary (it reads every row).

        Raises:
          IndexError: i outside ``[0, n)``.
        """
        if not 0 <= i < self.n:
            raise IndexError(f"SAE index {i} outside the stack's {self.n} SAEs")
        row, j = divmod(i, len(self.l0_coefficients))
        target = self.target_l0s[j] if self.target_l0s else None
        return None if self.crosslayer else row, self.l0_coefficients[j], target

    def saes_of_site(self, row: int) -> slice:
        """The stacked-param indices of row ``row``'s SAEs, its sweep in ``l0_coefficients`` order."""
        n_sweep = len(self.l0_coefficients)
        return slice(row * n_sweep, (row + 1) * n_sweep)


@dataclasses.dataclass(frozen=True)
class SAE:
    """Which one an SAE or transcoder of the grid is: ``params[stack][index]``, reading row ``row`` of the stack's
    batch, the site ``site`` (a source's site name), predicting ``site_out`` (``site`` itself for an SAE), trained
    with λ ``l0_coefficient`` and ``target_l0`` (None unless the sparsity loss is "target_l0"). A cross-layer
    dictionary (``crosslayer`` "clt" or "crosscoder") reads every row (``row`` None) and its ``layers``; ``site``
    and ``site_out`` then list its sites, comma-separated."""

    stack: str
    index: int
    row: int | None
    site: str
    site_out: str
    l0_coefficient: float
    target_l0: float | None
    transcoder: bool
    skip: bool
    crosslayer: str = ""

    @property
    def layers(self) -> tuple[int, ...]:
        """The model layers of the sites it reads, in order."""
        return tuple(Site.parse(s).layer for s in self.site.split(","))

    @property
    def label(self) -> str:
        """Its name in metrics and reports: the site, a transcoder's ``sites.transcoder_label``, or ``clt.<layers>``
        (``+skip``) / ``crosscoder.res.<layers>`` with the layers as a spec (``"0-17"``, ``"5,9,12"``)."""
        if self.crosslayer:
            spec = _layer_spec(self.layers)
            return f"clt.{spec}" + (" +skip" if self.skip else "") if self.crosslayer == "clt" else \
                f"crosscoder.res.{spec}"
        return transcoder_label(Site.parse(self.site), self.skip) if self.transcoder else self.site

    @property
    def release_site(self) -> Site | None:
        """The model site it reads as the release names it; None for ``sites.CUSTOM`` activations and cross-layer
        dictionaries."""
        return None if self.crosslayer else release_site(self.site)


def _layer_spec(layers: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2,5"``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)


def _identities(name: str, stack: Stack) -> tuple[SAE, ...]:
    """The SAEs of stack ``name`` in stacked-param order."""
    sites_out = stack.sites_out
    if stack.crosslayer:
        return tuple(SAE(name, i, None, ",".join(stack.sites), ",".join(sites_out), lam, target, stack.transcoder,
                         stack.skip, stack.crosslayer)
                     for i, (_, lam, target) in enumerate(map(stack.sae, range(stack.n))))
    return tuple(SAE(name, i, row, stack.sites[row], sites_out[row], lam, target, stack.transcoder, stack.skip)
                 for i, (row, lam, target) in enumerate(map(stack.sae, range(stack.n))))


def _extra_specs(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The site specs the transcoders, CLTs and crosscoders of a config read and predict (empty ones left out)."""
    specs = (transcoder_spec(config.transcoder.layers), transcoder_spec(config.clt.layers),
             crosscoder_spec(config.crosscoder.layers))
    return tuple(filter(None, specs))


def source_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``data`` block of the source a config's grid reads: ``config.data``, plus in ``data.sites`` each
    transcoder's and CLT layer's ``mlp_in.L`` and ``mlp.L`` (``sites.transcoder_spec``) and each crosscoder layer's
    ``res.L``, when ``transcoder.layers``, ``clt.layers`` or ``crosscoder.layers`` name layers."""
    extra = _extra_specs(config)
    if not extra:
        return config.data
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.sites = ",".join(filter(None, (config.data.sites.strip(), *extra)))
    return data


def _crosslayer_stacks(config, source, lambdas, targets) -> dict[str, Stack]:
    """The CLT stacks (one per ``clt.skip`` variant) and the crosscoder stack of a config."""
    stacks = {}
    if config.clt.layers.strip():
        inputs = tuple(str(s) for s in transcoder_inputs(config.clt.layers, source.num_layers))
        d = source.d_in[inputs[0]]
        for skip in config.clt.skip:
            stacks[f"clt{'_skip' if skip else ''}_d{d}"] = Stack(
                inputs, d, config.clt.width or config.sae.width, lambdas, targets, transcoder=True, skip=skip,
                crosslayer="clt", l0_per_layer=config.clt.l0 == "per_layer")
    if config.crosscoder.layers.strip():
        sites = tuple(str(s) for s in parse_sites(crosscoder_spec(config.crosscoder.layers), source.num_layers))
        d = source.d_in[sites[0]]
        stacks[f"xc_d{d}"] = Stack(sites, d, config.crosscoder.width or config.sae.width, lambdas, targets,
                                   crosslayer="crosscoder")
    return stacks


class Grid:
    """The stacks of a run and where their activations lie in the source's batches.

    Args:
      stacks: ``{stack name: Stack}``, in the order of metrics records and release files.
      source_groups: the source's ``{group: [site name, ...]}`` (``source.groups``): every site a stack reads or
        predicts, each stack's sites within one group.

    Raises:
      ValueError: a stack's sites (or the sites it predicts) lie in several source groups.
    """

    def __init__(self, stacks: dict[str, Stack], source_groups: dict[str, list[str]]):
        self.stacks = dict(stacks)
        self._source_groups = {g: list(sites) for g, sites in source_groups.items()}
        self._where = {site: (g, i) for g, sites in self._source_groups.items() for i, site in enumerate(sites)}
        self._saes = {name: _identities(name, stack) for name, stack in self.stacks.items()}
        # Per stack, (source group, its rows to gather or None for all of it) of what it reads, and for a
        # transcoder stack also of what it predicts.
        self._plans = {name: [self._plan(stack.sites)] + ([self._plan(stack.sites_out)] if stack.transcoder else [])
                       for name, stack in self.stacks.items()}

    @classmethod
    def build(cls, config: ml_collections.ConfigDict, source,
              sweep: tuple[tuple[float, ...], tuple[float, ...]]) -> Grid:
        """The config's grid over ``source`` (an ``activations.ActivationSource``): SAEs on ``data.sites`` (every
        source site without transcoders, CLTs or crosscoders), one stack per input width
        (``activations.group_sites``), and the transcoders of ``transcoder.layers`` once per ``transcoder.skip``
        variant; ``sae.width`` latents each, the sweep ``(λs, target L0s)`` of ``training.settings.sweep_of`` on
        every site. Then the CLT over ``clt.layers`` once per ``clt.skip`` variant and the crosscoder over
        ``crosscoder.layers`` (``clt.width`` / ``crosscoder.width`` latents, ``sae.width`` when None), the same
        sweep.

        Raises:
          ValueError: a malformed site name among the source's, or a bad site spec (``sites.parse_sites``).
        """
        lambdas, targets = sweep
        if _extra_specs(config):
            n = source.num_layers
            sae_sites = [str(s) for s in parse_sites(config.data.sites, n)] if config.data.sites.strip() else []
            inputs = [str(s) for s in transcoder_inputs(config.transcoder.layers, n)] \
                if config.transcoder.layers.strip() else []
        else:
            sae_sites, inputs = list(source.sites), []
        width = config.sae.width
        stacks = {name: Stack(tuple(sites), source.d_in[sites[0]], width, lambdas, targets)
                  for name, sites in group_sites(sae_sites, source.d_in).items()}
        for skip in config.transcoder.skip if inputs else ():
            d = source.d_in[inputs[0]]
            stacks[f"tc{'_skip' if skip else ''}_d{d}"] = Stack(tuple(inputs), d, width, lambdas, targets,
                                                                transcoder=True, skip=skip)
        stacks.update(_crosslayer_stacks(config, source, lambdas, targets))
        for name in source.sites:  # a malformed data.site fails here, before training, not at the release
            release_site(name)
        return cls(stacks, source.groups)

    @property
    def saes(self) -> tuple[SAE, ...]:
        """Every SAE and transcoder, stack by stack in stacked-param order."""
        return tuple(one for saes in self._saes.values() for one in saes)

    def saes_of(self, name: str) -> tuple[SAE, ...]:
        """The SAEs of stack ``name`` in stacked-param order (index ``i`` is ``params[name][i]``)."""
        return self._saes[name]

    def _plan(self, sites: tuple[str, ...]) -> tuple[str, tuple[int, ...] | None]:
        (g, *others) = sorted({self._where[s][0] for s in sites})
        if others:
            raise ValueError(f"sites {list(sites)} of one stack lie in several source groups ({[g, *others]})")
        index = tuple(self._where[s][1] for s in sites)
        return g, None if index == tuple(range(len(self._source_groups[g]))) else index

    def _pick(self, table: dict[str, np.ndarray], site: str) -> np.ndarray:
        g, i = self._where[site]
        return table[g][i]

    def constants(self, scales: dict[str, np.ndarray], b_dec: dict[str, np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The stacks' normalisation constants and initial b_dec from the source's per-site ones
        (``normalisation.normalisation_constants``: ``{group: [n_sites, d]}``).

        Returns:
          ``(norm_scale, b_dec)``: norm_scale ``{stack: C float32 [n_sites, d]}`` per row as the train state holds
          it (every SAE of a row sees the same ``x / C``), for a transcoder stack ``[n_sites, 2, d]`` = (C of its
          ``mlp_in.L``, C of its ``mlp.L``); b_dec ``{stack: float32 [n, d]}`` per SAE, stacked as the params
          (site-major), in the units of the site it predicts; ``[n, n_sites, d]`` for a cross-layer stack.
        """
        norm_scale, init = {}, {}
        for name, stack in self.stacks.items():
            norm_scale[name] = np.array(
                [[self._pick(scales, s), self._pick(scales, o)] if stack.transcoder else self._pick(scales, s)
                 for s, o in zip(stack.sites, stack.sites_out)], np.float32)
            per_row = np.stack([self._pick(b_dec, o) for o in stack.sites_out]).astype(np.float32)
            init[name] = np.stack([per_row] * stack.n) if stack.crosslayer else \
                per_row[[one.row for one in self._saes[name]]]
        return norm_scale, init

    def batches(self, mesh: jax.sharding.Mesh):
        """A function from a source batch ``{group: [n_sites, B, d]}`` to the step's: ``{stack: [n_sites, B, d]}``
        for an SAE stack, ``(x, y)`` of those for a transcoder stack (its ``mlp_in.L`` and the ``mlp.L`` they
        predict). Rows are gathered on the devices into ``mesh.batch_sharding``; a stack that is a whole source
        group is the source's array itself (no copy), so a run without transcoders feeds the source's batches
        unchanged."""
        gather = jax.jit(lambda x, index: x[np.array(index)], static_argnums=1,
                         out_shardings=mesh_lib.batch_sharding(mesh))

        def to_stacks(batch):
            taken = {name: [batch[g] if index is None else gather(batch[g], index) for g, index in plan]
                     for name, plan in self._plans.items()}
            return {name: tuple(x) if self.stacks[name].transcoder else x[0] for name, x in taken.items()}

        return to_stacks
