"""Feeding an activation source to the step: the grid's normalisation constants and initial b_dec from the source's
(``normalisation``), and the grid's batches (SAE stacks and transcoder (x, y) pairs) gathered from the source's on
the devices."""

from __future__ import annotations

import jax
import numpy as np

from gemma_scope import mesh as mesh_lib
from gemma_scope.sites import Site, transcoder_target
from gemma_scope.training import step as step_lib


def targets(groups: dict[str, list[str]], grid: dict[str, step_lib.Group]) -> dict[str, list[str]]:
    """The sites each grid group's SAEs reconstruct: its own sites, or for a transcoder group the ``mlp.L`` that
    each ``mlp_in.L`` predicts (``sites.transcoder_target``)."""
    return {g: [str(transcoder_target(Site.parse(s))) if grid[g].transcoder else s for s in sites]
            for g, sites in groups.items()}


def _where(source_groups: dict[str, list[str]]) -> dict[str, tuple[str, int]]:
    """``{site: (source group, index in it)}``."""
    return {site: (g, i) for g, sites in source_groups.items() for i, site in enumerate(sites)}


def grid_constants(source_groups: dict[str, list[str]], scales: dict[str, np.ndarray], b_dec: dict[str, np.ndarray],
                   groups: dict[str, list[str]], grid: dict[str, step_lib.Group]
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The grid's normalisation constants and initial b_dec from the source's
    (``normalisation.normalisation_constants``).

    Returns:
      ``({group: C float32 [n_sites, d]}, {group: b_dec float32 [n_sites, d]})``, and for a transcoder group C
      float32 ``[n_sites, 2, d]`` = (C of its input ``mlp_in.L``, C of its output ``mlp.L``) with b_dec in the
      output's units.
    """
    where = _where(source_groups)
    pick = lambda table, site: table[where[site][0]][where[site][1]]
    outputs = targets(groups, grid)
    grid_scales, grid_b_dec = {}, {}
    for g, sites in groups.items():
        grid_scales[g] = np.array([[pick(scales, s), pick(scales, o)] if grid[g].transcoder else pick(scales, s)
                                   for s, o in zip(sites, outputs[g])], np.float32)
        grid_b_dec[g] = np.stack([pick(b_dec, o) for o in outputs[g]]).astype(np.float32)
    return grid_scales, grid_b_dec


def grid_batches(source_groups: dict[str, list[str]], groups: dict[str, list[str]],
                 grid: dict[str, step_lib.Group], mesh):
    """A function from a source batch ``{source group: [n, B, d]}`` to the step's batch: ``{group: [n_sites, B,
    d]}`` for an SAE group, ``(x, y)`` of those for a transcoder group (its ``mlp_in.L`` and the ``mlp.L`` they
    predict). Rows are gathered on the devices into ``step.batch_sharding``; a group that is a whole source group
    is the source's array itself (no copy), so a run without transcoders feeds the source's batches unchanged.

    Raises:
      ValueError: the sites of one grid group lie in several source groups.
    """
    where = _where(source_groups)

    def plan(sites):  # (source group, rows to gather or None for all of it)
        (g, *others) = sorted({where[s][0] for s in sites})
        if others:
            raise ValueError(f"sites {sites} of one grid group lie in several source groups ({[g, *others]})")
        index = tuple(where[s][1] for s in sites)
        return g, None if index == tuple(range(len(source_groups[g]))) else index

    outputs = targets(groups, grid)
    plans = {g: [plan(sites)] + ([plan(outputs[g])] if grid[g].transcoder else []) for g, sites in groups.items()}
    gather = jax.jit(lambda x, index: x[np.array(index)], static_argnums=1,
                     out_shardings=mesh_lib.batch_sharding(mesh))

    def to_grid(batch):
        taken = {g: [batch[s] if index is None else gather(batch[s], index) for s, index in p]
                 for g, p in plans.items()}
        return {g: tuple(x) if grid[g].transcoder else x[0] for g, x in taken.items()}

    return to_grid

