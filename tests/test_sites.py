import pytest

from gemma_scope.sites import Site, parse_sites


def test_parse_expands_wildcards_and_ranges_sorted_unique():
    sites = parse_sites("mlp.1-2, res.*, mlp.2", num_layers=3)
    assert [str(s) for s in sites] == ["mlp.1", "mlp.2", "res.0", "res.1", "res.2"]
    assert Site.parse("att.7") == Site("att", 7)


@pytest.mark.parametrize("spec", ["res", "foo.1", "res.x", "res.3", "", "res.1-x"])
def test_bad_specs_raise_clear_errors(spec):
    with pytest.raises(ValueError, match="site|layer"):
        parse_sites(spec, num_layers=3)
