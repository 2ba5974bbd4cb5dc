"""Every experiments/ config loads and validates without importing jax; the paper runs carry the paper's budgets
and recipe; configs owns the recipe's defaults, λ's default follows the sparsity loss and hits the targets."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gemma_scope import activations, configs, sae
from gemma_scope.model import get_config as model_config
from gemma_scope.sae import losses
from gemma_scope.sites import crosscoder_spec, parse_sites, transcoder_spec
from gemma_scope.training import settings, step

EXPERIMENTS_DIR = pathlib.Path(__file__).parents[1] / "experiments"
EXPERIMENTS = sorted(EXPERIMENTS_DIR.glob("*.py"))
ROOT = EXPERIMENTS_DIR.parent
PAPER = {"2b_res": ("gemma2_2b", "res.12"), "2b_att": ("gemma2_2b", "att.12"), "2b_mlp": ("gemma2_2b", "mlp.12"),
         "9b_res": ("gemma2_9b", "res.20"), "9b_att": ("gemma2_9b", "att.20"), "9b_mlp": ("gemma2_9b", "mlp.20"),
         "27b_res": ("gemma2_27b", "res.10,res.22,res.34"), "9b_it_res": ("gemma2_9b", "res.9,res.20,res.31")}


def load(path, arg=None):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_validates(path):
    config = load(path)
    settings.validate_config(config)
    if config.data.source == "model":
        name = config.data.model_config or config.data.model
        spec = ",".join(filter(None, (config.data.sites, transcoder_spec(config.transcoder.layers),
                                      transcoder_spec(config.clt.layers), crosscoder_spec(config.crosscoder.layers))))
        parse_sites(spec, model_config(name).num_layers)  # sites (and the dictionaries' sites) exist in that model


def test_transcoder_runs():
    small = load(EXPERIMENTS_DIR / "gemma3_270m_transcoder.py")
    assert (small.data.sites, small.transcoder.layers, small.transcoder.skip) == ("", "4,8,12", (False, True))
    paper = load(EXPERIMENTS_DIR / "2b_transcoder.py", "layer=all")
    assert (paper.data.model_config, paper.data.sites, paper.transcoder.layers) == ("gemma2_2b", "", "*")
    assert paper.train.steps * paper.train.batch_size == pytest.approx(configs.paper_tokens(2**14), rel=1e-3)


def test_crosslayer_runs():
    small = load(EXPERIMENTS_DIR / "gemma3_270m_clt.py")
    assert (small.data.sites, small.clt.layers, small.clt.l0, small.sae.sparsity_loss) == \
        ("", "*", "per_layer", "target_l0")
    paper = load(EXPERIMENTS_DIR / "2b_clt.py")
    assert (paper.data.model_config, paper.clt.width, paper.clt.skip) == ("gemma2_2b", 10_080, (False, True))
    assert paper.train.steps * paper.train.batch_size == pytest.approx(configs.paper_tokens(262_080), rel=1e-3)
    assert load(EXPERIMENTS_DIR / "gemma3_270m_crosscoder.py").crosscoder.layers == "5,9,12,15"


def test_paper_runs_follow_the_recipe():
    assert {p.stem for p in EXPERIMENTS} >= set(PAPER)
    for stem, (name, sites) in PAPER.items():
        config = load(EXPERIMENTS_DIR / f"{stem}.py")
        assert (config.data.model_config, config.data.sites, config.data.model) == (name, sites, "")
        width = config.sae.width
        assert width == (2**17 if stem == "27b_res" else 2**14)
        assert config.train.steps * config.train.batch_size == pytest.approx(configs.paper_tokens(width), rel=1e-3)
        t = config.train
        assert (t.learning_rate, t.lr_warmup_steps, t.l0_warmup_steps, t.adam_b1, t.adam_b2, t.batch_size) == \
            (7e-5, 1000, 10000, 0.0, 0.999, 4096)
        assert (config.sae.bandwidth, config.sae.threshold_init, config.data.seq_len) == (0.001, 0.001, 1024)
        assert (config.sae.sparsity_loss, config.sae.b_dec_init) == ("l0", "zero")  # the paper's sparsity and init


def test_ablation_rows_share_the_default_budget_and_change_one_thing_each(make_npy_dir):
    spec = importlib.util.spec_from_file_location("ablation", EXPERIMENTS_DIR / "ablation/config.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    default = load(EXPERIMENTS_DIR / "gemma3_270m_res.py")
    acts = make_npy_dir()
    recipe_keys = ("normalisation", "b_dec_init", "sparsity_loss", "frequency_coefficient", "matryoshka_prefixes")
    recipes = {}
    for row in ablation.ROWS:
        config = ablation.get_config(f"row={row},site=res.8")
        settings.validate_config(config)
        config.data.path = str(acts)
        assert activations.make_source(config.data, config.seed).sites == ["res.8"]  # the data block is complete
        assert config.train.to_dict() == default.train.to_dict() and config.seed == default.seed
        assert config.sae.width == default.sae.width and config.data.site == "res.8"
        recipes[row] = tuple(config.sae[k] for k in recipe_keys)
        if row in ablation.PARENT:  # one change from its parent row
            assert sum(a != b for a, b in zip(recipes[row], recipes[ablation.PARENT[row]])) == 1, row
    assert set(ablation.PARENT) == set(ablation.ROWS[1:])
    with pytest.raises(ValueError, match="row must be one of"):
        ablation.get_config("row=topk")


def test_paper_run_arguments():
    config = load(EXPERIMENTS_DIR / "9b_res.py", "layer=all,width=1048576")
    assert config.data.sites == "res.*" and config.sae.width == 2**20
    assert config.train.steps * 4096 == pytest.approx(16e9, rel=1e-3)
    assert load(EXPERIMENTS_DIR / "2b_mlp.py", "layer=3").data.sites == "mlp.3"
    for bad in ("depth=3", "layer=x", "width=16k"):
        with pytest.raises(ValueError, match="layer|width|argument"):
            load(EXPERIMENTS_DIR / "2b_res.py", bad)


def test_model_source_without_a_checkpoint_says_what_to_pass():
    from gemma_scope import activations

    config = load(EXPERIMENTS_DIR / "9b_res.py")
    with pytest.raises(ValueError, match="data.model"):
        activations.make_source(config.data, seed=0)


def test_config_file_argument_reaches_get_config_and_bad_ones_are_clear_errors():
    path = EXPERIMENTS_DIR / "2b_res.py"
    config = load(path, "layer=3")
    assert config.data.sites == "res.3"
    with pytest.raises(ValueError, match="bad config argument"):
        load(path, "depth=3")


# Loads a config file as `python -m gemma_scope.train --config=FILE [--config.x.y=v]` does (ml_collections'
# config_flags, overrides from sys.argv), then reports sae.l0_coefficient and which of jax and optax were imported.
_LOAD_AS_TRAIN_DOES = """
import json, sys
from absl import flags
from ml_collections import config_flags
config = config_flags.DEFINE_config_file("config")
flags.FLAGS(sys.argv)
print(json.dumps({"l0_coefficient": config.value.sae.l0_coefficient,
                  "imported": [m for m in ("jax", "optax") if m in sys.modules]}))
"""


def _load_as_train_does(*args) -> dict:
    result = subprocess.run([sys.executable, "-c", _LOAD_AS_TRAIN_DOES, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("path", [*EXPERIMENTS, EXPERIMENTS_DIR / "ablation/config.py"],
                         ids=lambda p: str(p.relative_to(EXPERIMENTS_DIR)))
def test_reading_an_experiment_config_imports_neither_jax_nor_optax(path):
    assert _load_as_train_does(f"--config={path}")["imported"] == []


def test_l0_coefficient_not_given_is_the_sparsity_loss_default_and_a_given_one_wins():
    path = f"--config={EXPERIMENTS_DIR / 'from_activations.py'}"
    target = "--config.sae.sparsity_loss=target_l0", "--config.sae.target_l0=3,8"
    assert _load_as_train_does(path, *target)["l0_coefficient"] is None  # not given
    assert _load_as_train_does(path, *target, "--config.sae.l0_coefficient=0.5")["l0_coefficient"] == [0.5]
    assert _load_as_train_does(path, *target, "--config.sae.l0_coefficient=0.5,1")["l0_coefficient"] == [0.5, 1]
    config = load(EXPERIMENTS_DIR / "from_activations.py")
    assert settings.sweep_of(config) == ((configs.DEFAULT_L0_COEFFICIENT["l0"],), ())
    config.sae.update(sparsity_loss="target_l0", target_l0=(3.0, 8.0))
    assert settings.sweep_of(config) == ((configs.DEFAULT_L0_COEFFICIENT["target_l0"],) * 2, (3.0, 8.0))
    config.sae.l0_coefficient = (0.5, 1)
    assert settings.sweep_of(config) == ((0.5, 1.0), (3.0, 8.0))
    assert set(configs.DEFAULT_L0_COEFFICIENT) == set(losses.SPARSITY_LOSSES)  # a default for every loss


def test_the_embedded_default_keeps_lambda_1_towards_its_targets():
    assert settings.sweep_of(load(EXPERIMENTS_DIR / "gemma3_270m_res.py")) == ((1.0,) * 3, (50.0, 100.0, 200.0))
    assert settings.sweep_of(load(EXPERIMENTS_DIR / "gemma3_270m_transcoder.py")) == ((1.0,) * 2, (15.0, 45.0))


def test_configs_owns_the_recipe_defaults():
    """Hyperparams' defaults are train_config's, field for field as the trainer reads them; sae's own defaults
    (its pure functions', which cannot read configs) agree with the recipe."""
    recipe = configs.train_config(configs.npy_data())
    assert step.Hyperparams() == settings.hyperparams(recipe)
    assert (sae.DEFAULT_BANDWIDTH, sae.DEFAULT_THRESHOLD, losses.DEFAULT_FREQUENCY_THRESHOLD) == \
        (recipe.sae.bandwidth, recipe.sae.threshold_init, recipe.sae.frequency_threshold)


def test_config_argument_parser():
    defaults = {"layer": None, "width": "16384"}
    assert configs.parse_config_arg(None, defaults, "x") == defaults
    assert configs.parse_config_arg("width=8,layer=all", defaults, "x") == {"layer": "all", "width": "8"}
    for bad in ("depth=3", "layer", "layer=1,,w=2"):
        with pytest.raises(ValueError, match=r"bad config argument '(depth=3|layer|w=2)'; expected layer=<L>"):
            configs.parse_config_arg(bad, defaults, "layer=<L>")


@pytest.mark.slow
@pytest.mark.parametrize("normalisation", ["scalar", "per_dimension"])
def test_choosing_target_l0_alone_hits_the_targets(tmp_path, sparse_dictionary_data, normalisation):
    """`--config.sae.sparsity_loss=target_l0 --config.sae.target_l0=3,8` and no λ, on a known dictionary whose
    true L0 is 4 (so target 3 pulls against the reconstruction): each released SAE's average L0 within ±15% of its
    target. The budget flags make the run short (1,000 steps × 1,024, width 128, learning rate 3e-3)."""
    _, x = sparse_dictionary_data(np.random.default_rng(0), 32 * 1024, k=4)
    data = tmp_path / "acts"
    data.mkdir()
    for i, part in enumerate(np.array_split(x, 4)):
        np.save(data / f"part{i}.npy", part)
    result = subprocess.run(
        [sys.executable, "-m", "gemma_scope.train", "--config=experiments/from_activations.py",
         "--config.sae.sparsity_loss=target_l0", "--config.sae.target_l0=3,8",
         f"--config.sae.normalisation={normalisation}", f"--config.data.path={data}",
         f"--config.workdir={tmp_path / 'run'}", "--config.sae.width=128", "--config.train.steps=1000",
         "--config.train.batch_size=1024", "--config.train.learning_rate=3e-3", "--config.train.lr_warmup_steps=100",
         "--config.train.l0_warmup_steps=300", "--config.train.norm_batches=4", "--config.train.eval_batches=4"],
        # One CPU device: on 2 cores, XLA's 8 emulated devices sometimes deadlock in a collective's rendezvous and
        # abort ("only 6 of 8 arrived"; seen 2 in 5 runs of this 1,000-step run); sharding is tested elsewhere.
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    metas = [json.loads((p.parent / "cfg.json").read_text())["metadata"]
             for p in (tmp_path / "run/release").rglob("params.npz")]
    assert sorted((m["target_l0"], m["l0_coefficient"]) for m in metas) == [(3.0, 1.0), (8.0, 1.0)]
    for m in metas:
        assert m["average_l0"] == pytest.approx(m["target_l0"], rel=0.15), m
