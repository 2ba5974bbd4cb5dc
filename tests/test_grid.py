"""The grid: which SAE or transcoder reads which site, at which λ or target L0, and where it sits in the stacks."""

import importlib.util
import pathlib

import numpy as np
import pytest

from gemma_scope import activations
from gemma_scope.sites import Site
from gemma_scope.training.grid import Grid, Stack, source_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("from_activations", ROOT / "experiments/from_activations.py")
from_activations = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(from_activations)


class _Source:
    """The sites a model source of a 2-layer model reads for SAEs on res.0 and att.1 and transcoders of layers 0, 1
    (att is 8 wide, the rest 16)."""

    num_layers = 2
    sites = ["res.0", "att.1", "mlp_in.0", "mlp.0", "mlp_in.1", "mlp.1"]
    d_in = {site: 8 if site.startswith("att") else 16 for site in sites}
    groups = activations.group_sites(sites, d_in)


def _config(transcoder_layers="0,1"):
    config = from_activations.get_config()
    config.data.source, config.data.sites = "model", "res.0,att.1"
    config.transcoder.layers, config.transcoder.skip = transcoder_layers, (False, True)
    config.sae.width = 32
    return config


def test_build_names_every_sae_and_transcoder_site_major():
    grid = Grid.build(_config(), _Source(), ((1e-3, 2e-3), ()))
    tc = ("mlp_in.0", "mlp_in.1")
    assert grid.stacks == {"d8": Stack(("att.1",), 8, 32, (1e-3, 2e-3)), "d16": Stack(("res.0",), 16, 32, (1e-3, 2e-3)),
                           "tc_d16": Stack(tc, 16, 32, (1e-3, 2e-3), transcoder=True),
                           "tc_skip_d16": Stack(tc, 16, 32, (1e-3, 2e-3), transcoder=True, skip=True)}
    rows = [(s.stack, s.index, s.row, s.site, s.site_out, s.label, s.l0_coefficient, s.target_l0) for s in grid.saes]
    saes = [(name, j, 0, site, site, site, lam, None) for name, site in (("d8", "att.1"), ("d16", "res.0"))
            for j, lam in enumerate((1e-3, 2e-3))]
    transcoders = [(name, 2 * row + j, row, f"mlp_in.{row}", f"mlp.{row}", f"mlp_in.{row}→mlp.{row}{suffix}", lam,
                    None) for name, suffix in (("tc_d16", ""), ("tc_skip_d16", " +skip")) for row in range(2)
                   for j, lam in enumerate((1e-3, 2e-3))]
    assert rows == saes + transcoders
    assert grid.saes_of("tc_skip_d16")[3].skip and not grid.saes_of("tc_d16")[3].skip
    assert [s.release_site for s in grid.saes_of("tc_d16")[::2]] == [Site("mlp_in", 0), Site("mlp_in", 1)]


def test_without_transcoders_every_source_site_gets_a_target_l0_sweep():
    grid = Grid.build(_config(""), _Source(), ((0.5, 0.5), (50.0, 100.0)))
    assert list(grid.stacks) == ["d16", "d8"]
    assert grid.stacks["d16"].sites == ("res.0", "mlp_in.0", "mlp.0", "mlp_in.1", "mlp.1")
    assert [(s.site, s.target_l0) for s in grid.saes_of("d16")[:4]] == [
        ("res.0", 50.0), ("res.0", 100.0), ("mlp_in.0", 50.0), ("mlp_in.0", 100.0)]


def test_build_fails_early_on_a_malformed_site_name():
    source = _Source()
    source.sites = ["res.x"]
    source.d_in = {"res.x": 16}
    source.groups = {"d16": ["res.x"]}
    with pytest.raises(ValueError, match="bad site 'res.x'"):
        Grid.build(_config(""), source, ((1e-3,), ()))


def test_constants_are_stacked_as_the_params():
    """Each row's C (a transcoder's C of mlp_in.L and of mlp.L) and each SAE's b_dec, repeated over the sweep."""
    grid = Grid.build(_config(), _Source(), ((1e-3, 2e-3), ()))
    scales = {g: np.arange(1, len(s) + 1, dtype=np.float32)[:, None] * np.ones(_Source.d_in[s[0]], np.float32)
              for g, s in _Source.groups.items()}
    b_dec = {g: -c for g, c in scales.items()}
    norm_scale, init = grid.constants(scales, b_dec)
    # d16 source group: res.0, mlp_in.0, mlp.0, mlp_in.1, mlp.1 have C = 1, 2, 3, 4, 5.
    np.testing.assert_array_equal(norm_scale["d16"][:, 0], [1])
    np.testing.assert_array_equal(norm_scale["tc_skip_d16"][:, :, 0], [[2, 3], [4, 5]])
    np.testing.assert_array_equal(init["tc_d16"][:, 0], [-3, -3, -5, -5])
    np.testing.assert_array_equal(init["d8"], -np.ones((2, 8)))
    assert {k: v.dtype for k, v in init.items()} == {k: np.float32 for k in grid.stacks}


def test_a_stack_within_one_source_group_only():
    with pytest.raises(ValueError, match="several source groups"):
        Grid({"s": Stack(("a", "b"), 4, 8, (1e-3,))}, {"d4": ["a"], "d8": ["b"]})


def test_source_data_adds_the_transcoders_sites():
    config = _config("1")
    assert source_data(config).sites == "res.0,att.1,mlp_in.1,mlp.1"
    assert config.data.sites == "res.0,att.1"
    without = _config("")
    assert source_data(without) is without.data

