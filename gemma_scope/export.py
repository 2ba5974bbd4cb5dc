"""The release of a trained grid: every SAE folded into raw-activation space, its average L0 measured, and written
in the Gemma Scope layout (``release.write_sae``)."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma_scope import configs, hosts, release, sae
from gemma_scope.sites import Site
from gemma_scope.step import Group


def write_release(config, source, mesh, grid: dict[str, Group], release_sites: dict[str, Site | None],
                  state: dict) -> list[pathlib.Path]:
    """Folds every SAE of the grid (``sae.fold_normalisation``), measures its average L0 on the
    ``train.eval_batches`` batches after training, and writes it to ``<workdir>/release`` with ``release.write_sae``
    (process 0).

    Args:
      config: the run's config (``train.*``, ``seed``, ``workdir``).
      source: the run's activation source (its ``groups``: ``{group: [site name, ...]}``).
      mesh: the run's mesh; the L0 batches are measured where they are.
      grid: ``{group: step.Group}`` of the run.
      release_sites: ``{site name: Site or None (sites.CUSTOM)}``.
      state: the final train state.

    Returns:
      The written ``params.npz`` paths (empty on processes other than 0).

    SAEs of one site whose rounded average L0 coincide would share a release directory; the later ones are skipped
    with a warning (they remain in the checkpoint).
    """
    params = hosts.to_host(state["params"])
    scales = hosts.to_host(state["norm_scale"])
    batches = list(source.batches(config.train.batch_size, config.train.steps, mesh,
                                  stop=config.train.steps + config.train.eval_batches))
    l0_of = jax.jit(jax.vmap(lambda p, x: jnp.mean(jnp.sum(sae.encode(p, x.astype(jnp.float32)) > 0, axis=-1)),
                             in_axes=(0, None)), out_shardings=NamedSharding(mesh, P()))
    written, used = [], set()
    for g, sites in source.groups.items():
        grp = grid[g]
        for s, site in enumerate(sites):
            saes = grp.saes_of_site(s)
            folded = jax.vmap(sae.fold_normalisation, in_axes=(0, None))(
                jax.tree.map(lambda a: a[saes], params[g]), scales[g][s])
            l0 = np.mean([np.asarray(l0_of(folded, b[g][s])) for b in batches], axis=0)
            for j, i in enumerate(range(saes.start, saes.stop)):
                _, lam, target = grp.sae(i)
                key = (site, round(float(l0[j])))
                if key in used:
                    print(f"warning: SAE of site {site} with l0_coefficient={lam}, target_l0={target} has the same "
                          f"rounded average L0 ({key[1]}) as another; not released (it stays in the checkpoint)",
                          file=sys.stderr)
                    continue
                used.add(key)
                if jax.process_index() == 0:
                    one = {k: np.asarray(v[j], np.float32) for k, v in folded.items()}
                    meta = {"l0_coefficient": lam, "target_l0": target, **configs.recipe_metadata(config),
                            "training_steps": config.train.steps,
                            "training_tokens": config.train.steps * config.train.batch_size,
                            "normalisation_constant": float(scales[g][s]), "seed": config.seed}
                    written.append(release.write_sae(pathlib.Path(config.workdir) / "release", release_sites[site],
                                                     one, float(l0[j]), meta))
    return written
