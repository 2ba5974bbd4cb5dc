import pytest

from gemma_scope.sites import Site, parse_sites, release_site, transcoder_inputs, transcoder_pair


def test_parse_expands_wildcards_and_ranges_sorted_unique():
    sites = parse_sites("mlp.1-2, res.*, mlp.2", num_layers=3)
    assert [str(s) for s in sites] == ["mlp.1", "mlp.2", "res.0", "res.1", "res.2"]
    assert Site.parse("att.7") == Site("att", 7)


@pytest.mark.parametrize("spec", ["res", "foo.1", "res.x", "res.3", "", "res.1-x"])
def test_bad_specs_raise_clear_errors(spec):
    with pytest.raises(ValueError, match="site|layer"):
        parse_sites(spec, num_layers=3)


def test_transcoder_spec_target_and_label():
    from gemma_scope.sites import transcoder_label, transcoder_spec, transcoder_target

    assert transcoder_spec("4, 8") == "mlp_in.4,mlp.4,mlp_in.8,mlp.8"
    assert [str(s) for s in parse_sites(transcoder_spec("*"), 2)] == ["mlp.0", "mlp.1", "mlp_in.0", "mlp_in.1"]
    assert transcoder_spec("") == ""
    assert transcoder_target(Site("mlp_in", 3)) == Site("mlp", 3)
    with pytest.raises(ValueError, match="reads an mlp_in site"):
        transcoder_target(Site("mlp", 3))
    assert transcoder_label(Site("mlp_in", 3), skip=True) == "mlp_in.3→mlp.3 +skip"
    assert Site.parse("mlp_in.7") == Site("mlp_in", 7)


def test_the_transcoder_pairing_and_release_sites():
    assert transcoder_pair(3) == (Site("mlp_in", 3), Site("mlp", 3))
    assert transcoder_inputs("0-1, 3", 4) == [Site("mlp_in", 0), Site("mlp_in", 1), Site("mlp_in", 3)]
    assert release_site("custom") is None and release_site("att.2") == Site("att", 2)
    with pytest.raises(ValueError, match="bad site"):
        release_site("att")
