"""k-sparse probing (issue 23): sae-probes' datasets and protocol, the probes, the command and the report."""

import ast
import csv
import dataclasses
import json
import pathlib

import numpy as np
import pytest

from gemma_scope import model, probe
from gemma_scope.evaluation import probe_datasets, probe_report, probe_runs, probing

GOLDEN = pathlib.Path(__file__).parent / "golden"
pytest.importorskip("sklearn", reason="probing needs scikit-learn: pip install -e '.[probe]'")
zstandard = pytest.importorskip("zstandard", reason="probing needs zstandard: pip install -e '.[probe]'")
try:
    SAE_PROBES = probe_datasets.data_dir()
except FileNotFoundError:
    SAE_PROBES = None
needs_sae_probes = pytest.mark.skipif(SAE_PROBES is None, reason=f"sae-probes not installed; run: "
                                      f"{probe_datasets.INSTALL_HINT}")


def _from_sae_probes(module: str, names: list[str], namespace: dict) -> dict:
    """Functions and classes of the installed sae-probes source, executed without importing the package (its
    imports need torch): the reference our protocol must equal."""
    tree = ast.parse((SAE_PROBES.parent / f"{module}.py").read_text())
    nodes = [n for n in tree.body if getattr(n, "name", None) in names]
    exec(compile(ast.Module(nodes, type_ignores=[]), module, "exec"), namespace)
    return namespace


def planted(n=400, d=128, seed=0, shift=5.0):
    """Gaussian activations [n, d] whose class-1 rows (half) are moved by ``shift`` along a unit direction u; an
    SAE whose latent 0 reads u with threshold shift / 2 (so it fires on class 1 only) beside 63 random latents, and
    a random SAE of the same width."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    labels = np.arange(n) % 2
    x = (rng.normal(size=(n, d)) + shift * labels[:, None] * u).astype(np.float32)

    def sae(w_enc, threshold):
        width = w_enc.shape[1]
        return {"W_enc": w_enc.astype(np.float32), "b_enc": np.zeros(width, np.float32),
                "W_dec": w_enc.T.astype(np.float32), "b_dec": np.zeros(d, np.float32),
                "threshold": threshold.astype(np.float32)}

    random_dirs = rng.normal(size=(d, 64)) / np.sqrt(d)  # ~unit norm, cosine with u ~ 1/√d
    with_u = sae(np.concatenate([u[:, None], random_dirs[:, 1:]], axis=1), np.r_[shift / 2, np.full(63, 0.5)])
    return x, labels, with_u, sae(random_dirs, np.full(64, 0.5))


def test_k1_finds_the_planted_latent_and_a_random_sae_does_not():
    x, labels, with_u, random_sae = planted()
    dataset = probe_datasets.Dataset("planted", [""] * len(labels), labels, len(labels))
    train, test = probe_datasets.split(dataset)
    assert (len(train), len(test)) == (300, 99)  # all but 100 to train, the rest but one to test (sae-probes)
    result = probing.probe_dataset(x, labels, train, test, [with_u, random_sae], ks=(1, 5))
    found, chance = result["saes"]
    assert found["1"]["features"] == [0] and found["5"]["features"][0] == 0
    assert found["1"]["accuracy"] >= 0.99 and found["1"]["auc"] >= 0.99
    # measured 0.72 (k = 1) and 0.81 (k = 5): a random direction sees ~1/√d of the shift
    assert chance["1"]["accuracy"] < 0.8 and chance["5"]["accuracy"] < 0.9
    assert result["baseline"]["all"]["accuracy"] >= 0.98  # measured 0.99: the raw probe sees u in all d dims


def test_rank_features_normalises_by_the_mean_nonzero_magnitude():
    # feature 0: class means 110 and 90, mean |x| 100 → 0.2; feature 1: class means 1.5 and 0.25, mean |x| over
    # its 3 non-zero values 7/6 → 1.07. Unnormalised, feature 0's difference (20) would win.
    x = np.array([[105.0, 1.5], [115.0, 1.5], [95.0, 0.5], [85.0, 0.0]])
    y = np.array([1, 1, 0, 0])
    assert probing.rank_features(x, y).tolist() == [1, 0]
    np.testing.assert_array_equal(probing.rank_features(x[:, ::-1], y), [0, 1])


@needs_sae_probes
def test_split_and_probe_equal_sae_probes_own_functions():
    import sklearn.linear_model
    import sklearn.metrics
    import sklearn.model_selection

    namespace = {"np": np, "NamedTuple": __import__("typing").NamedTuple, "dataclass": dataclasses.dataclass,
                 "ClassifierMixin": object, "StandardScaler": object,
                 "LogisticRegression": sklearn.linear_model.LogisticRegression,
                 "roc_auc_score": sklearn.metrics.roc_auc_score, "accuracy_score": sklearn.metrics.accuracy_score,
                 "f1_score": sklearn.metrics.f1_score, "LeavePOut": sklearn.model_selection.LeavePOut,
                 "StratifiedKFold": sklearn.model_selection.StratifiedKFold}
    ref = _from_sae_probes("utils_data", ["get_train_test_indices"], namespace)
    ref = _from_sae_probes("utils_training", ["Metrics", "BestClassifierResults", "get_cv", "get_splits",
                                              "find_best_reg"], ref)
    x, labels, _, _ = planted(n=1200, d=8, shift=1.0)
    dataset = probe_datasets.Dataset("planted", [""] * len(labels), labels, len(labels))
    train, test = probe_datasets.split(dataset)
    want_train, want_test = ref["get_train_test_indices"](labels, 1024, len(labels) - 1025)
    np.testing.assert_array_equal(train, want_train)
    np.testing.assert_array_equal(test, want_test)
    got = probing.fit_probe(x[train], labels[train], x[test], labels[test], seed=42)
    want = ref["find_best_reg"](x[train], labels[train], x[test], labels[test], seed=42).metrics
    assert (got["accuracy"], got["auc"]) == (want.test_acc, want.test_auc)
    assert 0.6 < got["accuracy"] < 0.95  # a probe with something to learn, not a trivial one


def test_a_probe_on_one_class_is_reported_not_raised():
    x, labels, with_u, _ = planted(n=400)
    one_class = np.where(labels == 1)[0]
    result = probing.probe_dataset(x, labels, one_class[:150], np.arange(400)[250:], [with_u], ks=(1,))
    assert "one class" in result["baseline"]["error"] and "one class" in result["saes"][0]["error"]
    with pytest.raises(ValueError, match="test split holds one class"):
        probing.fit_probe(x[:200], labels[:200], x[one_class], labels[one_class])


@needs_sae_probes
def test_the_installed_datasets_and_the_default_subset():
    available = probe_datasets.binary_datasets()
    assert len(available) == 113 and set(probe_datasets.DEFAULT_DATASETS) <= set(available)
    dataset = probe_datasets.read_dataset("117_us_state_FL", available["117_us_state_FL"])
    assert (len(dataset.prompts), dataset.rows, dataset.labels.mean()) == (1000, 1000, 0.5)
    train, test = probe_datasets.split(dataset)
    assert (len(train), len(test)) == (900, 99) and not set(train) & set(test)
    assert dataset.labels[train].mean() == 0.5 and dataset.labels[test].sum() == 50
    assert probe_datasets.select("hist_fig_ismale,117_us_state_FL", available) == ["5_hist_fig_ismale",
                                                                                    "117_us_state_FL"]
    with pytest.raises(ValueError, match="unknown dataset 'hist_fig_isfemale'.*5_hist_fig_ismale"):
        probe_datasets.select("hist_fig_isfemale", available)


def _write_zst(path, rows, columns=("prompt", "target")):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(columns)] + [",".join(map(str, r)) for r in rows]
    path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))


@pytest.fixture
def fake_sae_probes(tmp_path, monkeypatch):
    """A data directory laid out as sae-probes' with four binary datasets: 1_good (the class is the prompt's last
    character), 2_missing (no file), 3_malformed (not zstandard), 4_oneclass (one target value)."""
    root = tmp_path / "sae_probes_data"
    master = [("Dataset Tag", "Dataset save name", "Data type")]
    master += [(name.split("_", 1)[1], f"cleaned_data/{name}.csv", "Binary Classification")
               for name in ("1_good", "2_missing", "3_malformed", "4_oneclass")]
    master.append(("age", "cleaned_data/9_age.csv", "Continuous Data"))
    _write_zst(root / probe_datasets.MASTER_FILE, master[1:], master[0])
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefgh"), size=rng.integers(1, 6))) for _ in range(230)]
    _write_zst(root / "cleaned_data/1_good.csv.zst", [(w + "xy"[i % 2], ["no", "yes"][i % 2])
                                                      for i, w in enumerate(words)])
    (root / "cleaned_data/3_malformed.csv.zst").write_bytes(b"not zstd")
    _write_zst(root / "cleaned_data/4_oneclass.csv.zst", [(w, "yes") for w in words])
    monkeypatch.setattr(probe_datasets, "data_dir", lambda: root)
    return root


class CharTokenizer:
    bos_id = 2

    def encode_batch(self, texts):
        return [[3 + ord(c) % 200 for c in text] for text in texts]


def test_cli_on_a_tiny_gemma_reports_bad_datasets_and_writes_the_table(fake_sae_probes, tmp_path, monkeypatch,
                                                                       capsys):
    # a random tiny Gemma 3 from files (initialising one compiles for minutes on a loaded CPU)
    lm = dataclasses.replace(model.load(GOLDEN / "gemma3_tiny_hf"), make_tokenizer=CharTokenizer)
    cfg = lm.config
    monkeypatch.setattr(probe_runs.model, "load", lambda name, config=None: lm)
    rng = np.random.default_rng(0)
    sae = {"W_enc": rng.normal(size=(cfg.d_model, 16)), "b_enc": np.zeros(16), "threshold": np.zeros(16),
           "W_dec": rng.normal(size=(16, cfg.d_model)), "b_dec": np.zeros(cfg.d_model)}
    (tmp_path / "sae").mkdir()
    np.savez(tmp_path / "sae" / "params.npz", **{k: v.astype(np.float32) for k, v in sae.items()})
    records = probe.main([f"--sae={tmp_path / 'sae'}", "--model=tiny", "--site=res.1", "--k=1,4",
                          "--datasets=good,missing,malformed,oneclass", f"--out={tmp_path / 'out'}"])
    out, err = capsys.readouterr()
    line = json.loads(out)
    assert line["datasets"] == 1 and line["site"] == "res.1" and list(line["k"]) == ["1", "4"]
    assert set(line["skipped"]) == {"2_missing", "3_malformed", "4_oneclass"}
    assert "missing from the installed sae-probes" in line["skipped"]["2_missing"]
    assert "not a zstandard-compressed" in line["skipped"]["3_malformed"]
    assert "expected 2 classes" in line["skipped"]["4_oneclass"]
    assert line["baseline"]["all"]["accuracy"] >= 0.95  # measured 0.99: the last token holds the class
    assert "skipping dataset 2_missing" in err and "1_good" in err
    assert records[0]["per_dataset"][0]["n_train"] == 130 and records[0]["per_dataset"][0]["n_test"] == 99
    with open(tmp_path / "out" / probe_report.CSV_FILE) as f:
        rows = list(csv.DictReader(f))
    assert [(r["features"], r["k"]) for r in rows] == [("raw", "all"), ("raw", "1"), ("raw", "4"), ("sae", "1"),
                                                       ("sae", "4")]
    assert float(rows[0]["accuracy"]) == line["baseline"]["all"]["accuracy"] and len(rows[4]["chosen"].split()) == 4
    assert float(rows[3]["accuracy"]) == line["k"]["1"]["accuracy"]
    assert (tmp_path / "out" / probe_report.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "out" / probe_report.TABLE_FILE).read_text()
    assert f"| mean of 1 | {line['baseline']['all']['accuracy']:.3f} |" in table and "- skipped 2_missing" in table


def test_cli_errors_are_one_clear_line(fake_sae_probes, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="--k=0: expected numbers of features >= 1"):
        probe.main([f"--sae={tmp_path}", "--k=0"])
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        probe_runs.probe_saes([], datasets="nope")
    # the default subset, none of which this package lists: each is reported, none crashes
    assert probe_runs.probe_saes([], lm=object()) == []
    assert "skipping dataset 24_headline_isiran: not listed in the installed" in capsys.readouterr().err
    monkeypatch.setattr(probe_datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps sae-probes==0.4.2"):
        probe_datasets.check_installed()


def test_eval_probe_puts_the_probing_section_in_the_trainer_report(tmp_path, monkeypatch):
    from gemma_scope import configs, train
    from gemma_scope.evaluation import report

    config = configs.train_config(configs.lm_data("gemma3_270m", "res.4"))
    config.workdir = str(tmp_path)
    assert config.eval.probe is False
    config.eval.probe = True
    metrics = {"accuracy": 0.8, "auc": 0.85, "C": 1.0}
    raw = {"all": dict(metrics, accuracy=0.9), "1": dict(metrics, accuracy=0.7)}
    record = {"sae": "rel/params.npz", "site": "res.4", "datasets": 1, "k": {"1": metrics}, "baseline": raw,
              "skipped": {"2_gone": "missing"}, "target_l0": 100.0,
              "per_dataset": [{"dataset": "1_d", "n_train": 900, "n_test": 99, "k": {"1": metrics}, "baseline": raw}]}
    calls = []
    monkeypatch.setattr(train, "probe_saes", lambda paths, **kw: calls.append((paths, kw)) or [record])

    def evaluate_saes(paths, *, out, notes, sections, **kw):
        return report.write_evaluation([{"site": "res.4", "width": 16, "l0": 5.0, "fvu": 0.1}], out, notes, sections)

    monkeypatch.setattr(train, "evaluate_saes", evaluate_saes)
    train.evaluate_run(config, ["rel/params.npz"])
    assert calls == [(["rel/params.npz"], {"model_name": "gemma3_270m", "model_config": None,
                                            "out": tmp_path / "report"})]
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.index("## Results") < text.index("## k-sparse probing") < text.index("### res.4 target L0 100")
    assert "| 1_d | 0.900 | 0.800 / 0.700 |" in text and "| mean of 1 | 0.900 | 0.800 / 0.700 |" in text
    assert "- skipped 2_gone: missing" in text and "![k-sparse probing](probing.png)" in text
