"""The release of a trained grid: every SAE and transcoder folded into raw-activation space, its average L0
measured, and written in the Gemma Scope 1 layout (SAEs, ``release.write_sae``) and the Gemma Scope 2 layout (SAEs
and transcoders, ``release_gs2.write_gs2``; CLTs and crosscoders, ``gs2_crosslayer.write_clt`` /
``write_crosscoder``)."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_scope import release, sae
from gemma_scope.release import gs2 as release_gs2
from gemma_scope.release import gs2_crosslayer
from gemma_scope.sae import crosslayer, crosslayer_train
from gemma_scope.sites import Site
from gemma_scope.training import hosts, settings
from gemma_scope.training.grid import Grid


def _check_finite(batches: list[dict], grid: Grid, mesh, first: int) -> None:
    """Raises ValueError naming the batch and site of the first NaN/Inf among the L0 batches: a latent never fires
    on NaN, so the release's average L0, and with it its name, would change silently."""
    finite = jax.jit(lambda x: jnp.isfinite(x).all(axis=(1, 2)), out_shardings=NamedSharding(mesh, P()))
    for number, batch in enumerate(batches, first):
        for g, stack in grid.stacks.items():
            ok = np.asarray(finite(batch[g][0] if stack.transcoder else batch[g]))  # [n_sites]
            if not ok.all():
                raise ValueError(f"activation batch {number}, read after training to measure the average L0 of each "
                                 f"SAE (train.eval_batches), holds NaN/Inf at site {stack.sites[int(np.argmin(ok))]!r};"
                                 " expected finite activations. Nothing was released; the trained SAEs are in the "
                                 "last checkpoint")


def write_release(config, source, mesh, grid: Grid, state: dict) -> list[pathlib.Path]:
    """Folds every SAE and transcoder of the grid (``sae.fold_normalisation``), measures its average L0 on the
    ``train.eval_batches`` batches after training, and writes it (process 0): SAEs in the Gemma Scope 1 layout under
    ``<workdir>/release`` (``release.write_sae``), SAEs on res/att/mlp sites and transcoders in the Gemma Scope 2
    layout under ``<workdir>/release_gs2`` (``release_gs2.write_gs2``; a sweep's directories labelled by
    ``release_gs2.gs2_labels``).

    Args:
      config: the run's config (``train.*``, ``seed``, ``workdir``, ``data.model``).
      source: the run's activation source.
      mesh: the run's mesh; the L0 batches are measured where they are.
      grid: the run's grid (which SAE is which: ``Grid.saes_of``).
      state: the final train state.

    Returns:
      The files to evaluate: the SAEs' ``params.npz`` and the transcoders' ``params.safetensors``, then the CLTs'
      and crosscoders' directories (empty on processes other than 0).

    Raises:
      ValueError: NaN/Inf in the L0 batches (naming the batch and site), before anything is written.

    SAEs (transcoders) of one site (and skip variant) whose rounded average L0 coincide would share a release
    directory; the later ones are skipped with a warning (they remain in the checkpoint).
    """
    params = hosts.to_host(state["params"])
    scales = hosts.to_host(state["norm_scale"])
    to_stacks = grid.batches(mesh)
    batches = [to_stacks(b) for b in source.batches(config.train.batch_size, config.train.steps, mesh,
                                                  stop=config.train.steps + config.train.eval_batches)]
    _check_finite(batches, grid, mesh, config.train.steps)
    l0_of = jax.jit(jax.vmap(lambda p, x: jnp.mean(jnp.sum(sae.encode(p, x.astype(jnp.float32)) > 0, axis=-1)),
                             in_axes=(0, None)), out_shardings=NamedSharding(mesh, P()))
    workdir = pathlib.Path(config.workdir)
    written, used = [], set()
    model_name = config.data.get("model") or getattr(source, "model_name", None) or ""
    # Which text the release's L0 (the directory name, GS2's l0 and bucket) was measured on.
    measured_on = (f"train split: {len(batches)} batches x {config.train.batch_size} activations of the training "
                   "stream after the last step")
    for g, stack in grid.stacks.items():
        if stack.crosslayer:
            written += _write_crosslayer(config, source.num_layers, grid, g, params[g], scales[g],
                                         [b[g] for b in batches])
            continue
        for row in range(stack.n_sites):
            saes = stack.saes_of_site(row)
            trained = jax.tree.map(lambda a: a[saes], params[g])
            # scales[g][row]: C [d], or a transcoder's (C of mlp_in.L, C of mlp.L) [2, d], whose L0 is taken on
            # the x of (x, y).
            constants = scales[g][row].reshape(-1, scales[g].shape[-1])
            folded = jax.vmap(sae.fold_normalisation, in_axes=(0, *[None] * len(constants)))(trained, *constants)
            l0 = np.mean([np.asarray(l0_of(folded, (b[g][0] if stack.transcoder else b[g])[row])) for b in batches],
                         axis=0)
            labels = release_gs2.gs2_labels([float(v) for v in l0])
            for j, one in enumerate(grid.saes_of(g)[saes]):
                key = (g, one.site, round(float(l0[j])))
                if key in used:
                    print(f"warning: {'transcoder' if one.transcoder else 'SAE'} of site {one.site} with "
                          f"l0_coefficient={one.l0_coefficient}, target_l0={one.target_l0} has the same rounded "
                          f"average L0 ({key[2]}) as another; not released (it stays in the checkpoint)",
                          file=sys.stderr)
                    continue
                used.add(key)
                if jax.process_index() != 0:
                    continue
                weights = {k: np.asarray(v[j], np.float32) for k, v in folded.items()}
                gs2 = dict(model_name=release.peer_model_name(model_name), l0_label=labels[j], l0_measured_on=measured_on)
                site = one.release_site
                if one.transcoder:
                    written.append(release_gs2.write_gs2(workdir / "release_gs2", site, weights, float(l0[j]),
                                                         site_out=Site.parse(one.site_out), **gs2))
                    continue
                meta = {"model_name": model_name or None, "context_size": getattr(source, "seq_len", None),
                         "average_l0_measured_on": measured_on, "l0_coefficient": one.l0_coefficient, "target_l0": one.target_l0,
                        **settings.recipe_metadata(config), "training_steps": config.train.steps,
                        "training_tokens": config.train.steps * config.train.batch_size, "seed": config.seed}
                if config.sae.normalisation == "scalar":  # one C per site: Gemma Scope's normalisation constant
                    meta["normalisation_constant"] = float(scales[g][row][0])
                written.append(release.write_sae(workdir / "release", site, weights, float(l0[j]), meta))
                if site is not None and site.kind in release_gs2.GS2_FOLDERS:
                    release_gs2.write_gs2(workdir / "release_gs2", site, weights, float(l0[j]), **gs2)
    return written


def _write_crosslayer(config, n_layers: int, grid: Grid, name: str, params: dict, scales: np.ndarray,
                      batches: list) -> list[pathlib.Path]:
    """Folds each CLT (``crosslayer_train.fold_clt``) or crosscoder (``fold_crosscoder``) of cross-layer stack
    ``name``, measures its average L0 on ``batches`` (raw activations, a CLT's per layer, ``crosslayer.clt_encode``)
    and writes it under ``<workdir>/release_gs2`` (process 0); a sweep's directories are labelled by
    ``release_gs2.gs2_labels`` of their (mean per layer) L0. Returns the directories written."""
    stack = grid.stacks[name]
    if stack.crosslayer == "clt":
        folded = jax.vmap(crosslayer_train.fold_clt, in_axes=(0, None, None))(params, scales[:, 0], scales[:, 1])
        encode = jax.jit(jax.vmap(lambda p, x: jnp.mean(jnp.sum(crosslayer.clt_encode(p, x) > 0, -1), -1),
                                  in_axes=(0, None)))
    else:
        folded = jax.vmap(crosslayer_train.fold_crosscoder, in_axes=(0, None))(params, scales)
        encode = jax.jit(jax.vmap(lambda p, x: jnp.mean(jnp.sum(crosslayer.crosscoder_encode(p, x) > 0, -1)),
                                  in_axes=(0, None)))
    # A CLT's batch is (x, y), its L0 taken on x; a crosscoder's is x.
    l0 = np.mean([np.asarray(encode(folded, b[0] if stack.transcoder else b)) for b in batches], axis=0)
    labels = release_gs2.gs2_labels([float(np.mean(v)) for v in l0])
    root, written = pathlib.Path(config.workdir) / "release_gs2", []
    for one in grid.saes_of(name):
        if jax.process_index() != 0:
            continue
        weights = {k: np.asarray(v[one.index], np.float32) for k, v in folded.items()}
        meta = {"model_name": config.data.get("model") or "", "l0_coefficient": one.l0_coefficient,
                "target_l0": one.target_l0, **settings.recipe_metadata(config), "training_steps": config.train.steps,
                "training_tokens": config.train.steps * config.train.batch_size, "seed": config.seed}
        if stack.crosslayer == "clt":
            meta["clt_l0"] = config.clt.l0
            written.append(gs2_crosslayer.write_clt(root, weights, list(one.layers), n_layers=n_layers,
                                                    average_l0=[float(v) for v in l0[one.index]], metadata=meta,
                                                    l0_label=labels[one.index]))
        else:
            written.append(gs2_crosslayer.write_crosscoder(root, weights, list(one.layers),
                                                           average_l0=float(l0[one.index]), metadata=meta,
                                                           l0_label=labels[one.index]))
    return written
