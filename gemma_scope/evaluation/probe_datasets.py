"""sae-probes' binary probing datasets, read from the installed ``sae-probes`` wheel (Kantamneni et al. 2025,
arXiv 2502.16681), and its train/test protocol.

The wheel ships ~155 ``cleaned_data/*.csv.zst`` files and ``probing_datasets_MASTER.csv.zst``; the 113 rows of the
master table of type "Binary Classification" name the probing datasets (``<number>_<tag>``, e.g.
``5_hist_fig_ismale``). We read only these data files (zstandard + the stdlib csv module), never import
``sae_probes`` (it imports torch, sae-lens and transformer-lens) and never download. Install it with::

    pip install zstandard scikit-learn && pip install --no-deps sae-probes==0.4.2    # or: pip install -e '.[probe]'

Protocol of sae-probes 0.4.2's "normal" setting (``utils_data.get_xy_traintest`` and
``generate_sae_activations_normal``), kept exactly so that our splits are its splits:

- labels: the ``target`` column encoded as scikit-learn's ``LabelEncoder`` does (sorted distinct values → 0, 1);
- the first ``MAX_EXAMPLES`` = 5,000 rows; ``num_train = min(rows − 100, 1024)`` (rows of the whole file), the test
  set everything else but one row;
- both splits balanced: ``ceil(num / 2)`` positives, drawn without replacement by ``np.random.RandomState(42)``,
  train first, then test from the rest (`split`);
- the activation is the prompt's last token (see ``evaluation.probing``), prompts tokenised with BOS and truncated
  on the left to ``MAX_SEQ_LEN`` = 1,024 tokens.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import importlib.metadata
import importlib.util
import io
import math
import pathlib

import numpy as np

PINNED_VERSION = "0.4.2"
INSTALL_HINT = f"pip install zstandard scikit-learn && pip install --no-deps sae-probes=={PINNED_VERSION}"
MASTER_FILE = "probing_datasets_MASTER.csv.zst"
BINARY = "Binary Classification"
MAX_EXAMPLES = 5000  # sae-probes' MAX_AMT
MAX_TRAIN = 1024
MIN_TEST = 100
MAX_SEQ_LEN = 1024
SEED = 42

# The default subset: 6 of the smallest datasets of short prompts (4–30 tokens) across sae-probes' kinds of task
# (places, people, headlines, temporal and causal categories): 8,472 prompts, 67,390 tokens (113k padded), so
# that one SAE takes a few minutes on an idle 2-core CPU (README "k-sparse probing" has the measured times).
DEFAULT_DATASETS = (
    "24_headline_isiran", "117_us_state_FL", "123_world_country_United_Kingdom", "130_temp_cat_Frequency",
    "133_context_type_Causality", "154_athlete_sport_football",
)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One binary probing dataset: ``name`` (``<number>_<tag>``), ``prompts`` (the first ``MAX_EXAMPLES``),
    ``labels`` int64 [N] in {0, 1} and ``rows`` (the file's row count, which sets ``num_train``)."""

    name: str
    prompts: list[str]
    labels: np.ndarray
    rows: int


def data_dir() -> pathlib.Path:
    """The ``data`` directory of the installed ``sae_probes`` package (found without importing it).

    Raises:
      FileNotFoundError: sae-probes is not installed (the message gives the install line).
    """
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the sae-probes datasets are not installed; run: {INSTALL_HINT}")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "data"


def check_installed() -> None:
    """Raises FileNotFoundError (with the install line) unless sae-probes, zstandard and scikit-learn are installed."""
    data_dir()
    for module in ("zstandard", "sklearn"):
        if importlib.util.find_spec(module) is None:
            raise FileNotFoundError(f"probing needs {module}; run: {INSTALL_HINT}")


def installed_version() -> str | None:
    """The installed sae-probes version (`PINNED_VERSION` is the one we read and tested), None if unknown."""
    try:
        return importlib.metadata.version("sae-probes")
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    """The rows of a zstandard-compressed CSV file. Raises FileNotFoundError, or ValueError naming the file."""
    import zstandard

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed sae-probes package")
    csv.field_size_limit(2**31 - 1)  # prompts of whole articles
    try:
        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
            return list(csv.DictReader(io.TextIOWrapper(stream, encoding="utf-8", newline="")))
    except (zstandard.ZstdError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path.name}: not a zstandard-compressed UTF-8 CSV ({e})") from None


def binary_datasets(root: pathlib.Path | None = None) -> dict[str, pathlib.Path]:
    """{name: file} of the master table's binary datasets, in its order (sae-probes' ``get_numbered_binary_tags``).

    Raises:
      FileNotFoundError: sae-probes (or its master table) is not installed. ValueError: a malformed master table.
    """
    root = data_dir() if root is None else root
    rows = _read_csv(root / MASTER_FILE)
    if rows and not {"Data type", "Dataset save name"} <= rows[0].keys():
        raise ValueError(f"{MASTER_FILE}: expected columns 'Data type' and 'Dataset save name'")
    saved = [row["Dataset save name"] for row in rows if row["Data type"] == BINARY]
    return {pathlib.PurePosixPath(name).name.split(".")[0]: root / f"{name}.zst" for name in saved}


def select(names: str | None, available: dict[str, pathlib.Path]) -> list[str]:
    """The dataset names a ``--datasets`` value asks for: None → `DEFAULT_DATASETS`, "all" → every binary dataset,
    else a comma-separated list of names (``5_hist_fig_ismale``; the tag alone, ``hist_fig_ismale``, also works).

    Raises:
      ValueError: an unknown name (with the closest known ones).
    """
    if names is None:
        return list(DEFAULT_DATASETS)
    if names.strip() == "all":
        return list(available)
    by_tag = {name.split("_", 1)[1]: name for name in available}
    chosen = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in available and name not in by_tag:
            close = difflib.get_close_matches(name, [*available, *by_tag], n=3)
            raise ValueError(f"--datasets: unknown dataset {name!r}; expected sae-probes names such as "
                             f"{', '.join(close or list(available)[:3])} (or 'all')")
        chosen.append(name if name in available else by_tag[name])
    return chosen


def read_dataset(name: str, path: pathlib.Path) -> Dataset:
    """Reads one dataset file (columns ``prompt`` and ``target``).

    Raises:
      FileNotFoundError: the file is missing. ValueError: unreadable, without those columns, or not two classes.
    """
    rows = _read_csv(path)
    if not rows or not {"prompt", "target"} <= rows[0].keys():
        raise ValueError(f"{path.name}: expected a CSV with columns 'prompt' and 'target'")
    targets = [row["target"] for row in rows[:MAX_EXAMPLES]]
    classes = sorted(set(targets), key=_label_order)
    if len(classes) != 2:
        raise ValueError(f"{path.name}: expected 2 classes in 'target', found {len(classes)}")
    labels = np.array([classes.index(t) for t in targets], np.int64)
    return Dataset(name, [row["prompt"] for row in rows[:MAX_EXAMPLES]], labels, len(rows))


def _label_order(value: str):
    """LabelEncoder's order of pandas' parsed column: numbers numerically, everything else as text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def split(dataset: Dataset, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) of sae-probes' normal setting (module docstring), equal to its
    ``get_train_test_indices(y, num_train, num_test, 0.5, seed)``.

    Raises:
      ValueError: too few examples (fewer than ``num_train`` + 100), or too few of one class for a balanced split.
    """
    n = len(dataset.labels)
    num_train = min(dataset.rows - MIN_TEST, MAX_TRAIN)
    num_test = n - num_train - 1
    if num_train < 2 or num_train + min(MIN_TEST, num_test) > n:
        raise ValueError(f"{dataset.name}: {n} examples; need {MAX_TRAIN} (or all but {MIN_TEST}) to train and "
                         f"{MIN_TEST} to test")
    rng = np.random.RandomState(seed)
    pos, neg = np.where(dataset.labels == 1)[0], np.where(dataset.labels == 0)[0]
    pos_train, pos_test = math.ceil(num_train / 2), math.ceil(num_test / 2)
    need_pos, need_neg = pos_train + pos_test, num_train + num_test - pos_train - pos_test
    if len(pos) < need_pos or len(neg) < need_neg:
        raise ValueError(f"{dataset.name}: {len(pos)} positive and {len(neg)} negative examples; a balanced split "
                         f"needs {need_pos} and {need_neg}")
    train_pos = rng.choice(pos, size=pos_train, replace=False)
    train_neg = rng.choice(neg, size=num_train - pos_train, replace=False)
    test_pos = rng.choice(np.setdiff1d(pos, train_pos), size=pos_test, replace=False)
    test_neg = rng.choice(np.setdiff1d(neg, train_neg), size=num_test - pos_test, replace=False)
    return (rng.permutation(np.concatenate([train_pos, train_neg])),
            rng.permutation(np.concatenate([test_pos, test_neg])))
