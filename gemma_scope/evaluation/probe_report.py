"""Tables and a plot of k-sparse probing records (``probe_runs.probe_saes``): per-dataset test accuracy of each
SAE's k-sparse probes against the raw-activation baselines (all d dimensions, and the top k), and the means."""

from __future__ import annotations

import csv
import itertools
import pathlib
from collections.abc import Sequence

from gemma_scope.files import atomic_path

CSV_FILE, TABLE_FILE, PLOT_FILE = "probing.csv", "probing.md", "probing.png"
LEGEND = """\
k-sparse probing on sae-probes' binary datasets (sae-probes 0.4.2 protocol: last-token activations, balanced
train split of up to 1,024 prompts, the rest of the first 5,000 to test). SAE k: logistic regression on the k SAE
latents with the largest normalised difference of class means on the train split; raw k: the same on the k
raw dimensions of the site; raw all: on all d dimensions. Accuracy on the test split; means over datasets."""


def _label(record: dict) -> str:
    target = record.get("target_l0")
    name = f"target L0 {target:g}" if target else pathlib.Path(record["sae"]).parent.name
    return f"{record['site']} {name}"


def _rows(record: dict) -> list[list[str]]:
    """One row per dataset and a mean row: dataset, raw all, then per k "SAE / raw" accuracies."""
    rows = []
    for entry in record["per_dataset"]:
        if "error" in entry:
            rows.append([entry["dataset"], f"not fitted: {entry['error']}"])
            continue
        cells = [entry["dataset"], f"{entry['baseline']['all']['accuracy']:.3f}"]
        cells += [f"{entry['k'][k]['accuracy']:.3f} / {entry['baseline'][k]['accuracy']:.3f}" for k in entry["k"]]
        rows.append(cells)
    if record["datasets"]:
        rows.append([f"mean of {record['datasets']}", f"{record['baseline']['all']['accuracy']:.3f}"]
                    + [f"{record['k'][k]['accuracy']:.3f} / {record['baseline'][k]['accuracy']:.3f}"
                       for k in record["k"]])
    return rows


def _skipped_datasets(record: dict) -> dict[str, str]:
    """The skipped datasets that have no row of their own (those whose probes failed have one)."""
    listed = {e["dataset"] for e in record["per_dataset"]}
    return {name: why for name, why in record["skipped"].items() if name not in listed}


def _header(record: dict) -> list[str]:
    return ["dataset", "raw all"] + [f"k={k} SAE / raw" for k in record["k"]]


def text_table(record: dict) -> str:
    """A plain-text table of one record's test accuracies (stderr of ``python -m gemma_scope.probe``)."""
    rows = [_header(record)] + _rows(record)
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    lines = [f"{record['sae']} ({record['site']}): test accuracy"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"skipped {name}: {why}" for name, why in _skipped_datasets(record).items()]
    return "\n".join(lines)


def markdown(records: Sequence[dict], plot: str | None = PLOT_FILE) -> str:
    """A Markdown section: the legend, the plot (if ``plot``), and per SAE its per-dataset table and mean row."""
    parts = ["## k-sparse probing", LEGEND]
    if plot:
        parts.append(f"![k-sparse probing]({plot})")
    for record in records:
        header = _header(record)
        lines = [f"### {_label(record)}", f"`{record['sae']}`", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r + [""] * (len(header) - len(r))) + " |" for r in _rows(record)]
        lines += [f"- skipped {name}: {why}" for name, why in _skipped_datasets(record).items()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def write_csv(records: Sequence[dict], path: str | pathlib.Path) -> pathlib.Path:
    """One row per (SAE, dataset, probe): sae, site, dataset, n_train, n_test, features ("sae" or "raw"), k ("all"
    or a number), accuracy, auc, C, chosen (space-separated feature indices); a dataset whose probes could not be
    fitted has one row with its error. Written atomically."""
    columns = ["sae", "site", "dataset", "n_train", "n_test", "features", "k", "accuracy", "auc", "C", "chosen",
               "error"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for record, entry in ((r, e) for r in records for e in r["per_dataset"]):
            base = {"sae": record["sae"], "site": record["site"], "dataset": entry["dataset"],
                    "n_train": entry["n_train"], "n_test": entry["n_test"]}
            if "error" in entry:
                writer.writerow({**base, "error": entry["error"]})
                continue
            probes = [("raw", k, m) for k, m in entry["baseline"].items()]
            probes += [("sae", k, m) for k, m in entry["k"].items()]
            for features, k, m in probes:
                writer.writerow({**base, "features": features, "k": k, "accuracy": m["accuracy"], "auc": m["auc"],
                                 "C": m["C"], "chosen": " ".join(map(str, m.get("features", [])))})
    return pathlib.Path(path)


def plot(records: Sequence[dict], path: str | pathlib.Path) -> pathlib.Path:
    """Mean test accuracy against k, one panel per site: each SAE (solid), the raw top-k dimensions (dashed) and
    all raw dimensions (dotted line). Records with no fitted dataset are left out. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if r["datasets"]]
    by_site = {site: list(group) for site, group in itertools.groupby(sorted(records, key=lambda r: r["site"]),
                                                                      key=lambda r: r["site"])}
    fig, axes = plt.subplots(1, max(1, len(by_site)), figsize=(5.2 * max(1, len(by_site)), 4), squeeze=False)
    for ax, (site, group) in zip(axes[0], by_site.items()):
        for record in group:
            ks = list(record["k"])
            ax.plot([int(k) for k in ks], [record["k"][k]["accuracy"] for k in ks], marker="o", label=_label(record))
        first = group[0]
        ks = [k for k in first["baseline"] if k != "all"]
        ax.plot([int(k) for k in ks], [first["baseline"][k]["accuracy"] for k in ks], "k--", marker="s",
                label="raw, top-k dims")
        ax.axhline(first["baseline"]["all"]["accuracy"], color="k", linestyle=":", label="raw, all dims")
        ax.set_xscale("log")
        ax.set_xticks([int(k) for k in ks], [str(k) for k in ks])
        ax.set_xlabel("k (features in the probe)")
        ax.set_ylabel(f"mean test accuracy ({first['datasets']} datasets)")
        ax.set_title(f"k-sparse probing at {site}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return pathlib.Path(path)


def write(records: Sequence[dict], out_dir: str | pathlib.Path) -> pathlib.Path:
    """Writes ``probing.csv``, ``probing.png`` and ``probing.md`` (the `markdown` section) into ``out_dir``;
    returns the Markdown file's path."""
    out_dir = pathlib.Path(out_dir)
    write_csv(records, out_dir / CSV_FILE)
    plot(records, out_dir / PLOT_FILE)
    with atomic_path(out_dir / TABLE_FILE) as tmp:
        tmp.write_text(markdown(records) + "\n")
    return out_dir / TABLE_FILE
