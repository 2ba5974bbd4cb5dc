"""k-sparse probing of released SAE files (``evaluation.probing``) on sae-probes' datasets: one forward pass per
batch of prompts captures every site the SAEs read; each SAE's record holds its per-dataset results and the means
over the datasets, printed one JSON line per SAE, with a table and a plot (``probe_report``) on request."""

from __future__ import annotations

import json
import pathlib
import sys
import time
from collections.abc import Sequence

from gemma_scope import model, release
from gemma_scope.evaluation import probe_datasets, probe_report, probing
from gemma_scope.files import json_ready
from gemma_scope.sites import Site

PRINTED = ("sae", "site", "datasets", "k", "baseline", "skipped")  # the JSON line's keys (issue 23's format + skips)


def _load_saes(sae_paths: Sequence[pathlib.Path], site: str | None) -> list[dict]:
    saes = []
    for path in sae_paths:
        info = release.sae_info(path)
        name = site or info["site"]
        if name is None:
            raise ValueError(f"{path}: cannot tell which site the SAE reads; pass --site (e.g. --site=res.8)")
        saes.append({"sae": str(path), "site": Site.parse(name), "params": release.load_params(path),
                     "target_l0": info["target_l0"]})
    return saes


def probe_saes(sae_paths: Sequence[str | pathlib.Path], *, model_name: str = "gemma3_270m",
               model_config: str | None = None, site: str | None = None,
               datasets: str | None = None, ks: Sequence[int] = probing.DEFAULT_KS,
               max_seq_len: int = probe_datasets.MAX_SEQ_LEN, batch_tokens: int = 1024,
               seed: int = probe_datasets.SEED, out: str | pathlib.Path | None = None, lm=None,
               progress: bool = True) -> list[dict]:
    """Probes each SAE file on the chosen datasets (``probe_datasets.select``: default subset, "all" or a list)
    and prints one JSON line per SAE: ``{"sae", "site", "datasets": N, "k": {k: {"accuracy", "auc"}},
    "baseline": {"all": ..., k: ...}, "skipped": {dataset: reason}}``, the means over the N datasets where both
    the SAE's and the raw probes could be fitted. Per-dataset results go to stderr as a table.

    Args:
      sae_paths: SAE files (``release.find_saes``); a transcoder's latents are probed on its input site.
      model_name, model_config: the LM (``model.load``), unless ``lm`` (a ``model.LoadedModel``) is given.
      site: overrides the site each SAE reads (default: from its release).
      ks: numbers of features; ``max_seq_len``, ``batch_tokens``: ``probing.last_token_activations``.
      out: directory for ``probing.csv``, ``probing.md`` and ``probing.png`` (``probe_report.write``).

    Returns:
      One record per SAE: the printed keys plus ``target_l0``, ``per_dataset`` (list of {"dataset", "n_train",
      "n_test", "k", "baseline"} or {"dataset", "error"}) and ``seconds`` (wall and CPU seconds of the forward passes and of the probes).

    Raises:
      FileNotFoundError: sae-probes or scikit-learn not installed. ValueError: an unknown dataset name, a k < 1,
        an SAE whose site is unknown, a malformed SAE file. A dataset file that is missing or malformed is reported
        (stderr and ``skipped``) and left out; so is a probe that cannot be fitted.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"--k must list numbers of features >= 1, got {list(ks)}")
    probe_datasets.check_installed()  # fail before the model loads
    available = probe_datasets.binary_datasets()
    names = probe_datasets.select(datasets, available)
    version = probe_datasets.installed_version()
    if version != probe_datasets.PINNED_VERSION:
        print(f"warning: sae-probes {version} is installed; these datasets were read with "
              f"{probe_datasets.PINNED_VERSION} ({probe_datasets.INSTALL_HINT})", file=sys.stderr)
    saes = _load_saes([pathlib.Path(p) for p in sae_paths], site)
    sites = sorted({s["site"] for s in saes})
    lm = lm or model.load(model_name, config=model_config or None)
    skipped, seconds = {}, {"forward": 0.0, "probes": 0.0, "forward_cpu": 0.0, "probes_cpu": 0.0}
    for s in saes:
        s["per_dataset"] = []
    for name in names:
        try:
            if name not in available:  # a default dataset that another sae-probes version does not list
                raise FileNotFoundError(f"not listed in the installed {probe_datasets.MASTER_FILE}")
            dataset = probe_datasets.read_dataset(name, available[name])
            train, test = probe_datasets.split(dataset, seed)
        except (FileNotFoundError, ValueError) as e:
            skipped[name] = str(e)
            print(f"probe: skipping dataset {name}: {e}", file=sys.stderr)
            continue
        start, cpu = time.perf_counter(), time.process_time()
        acts = probing.last_token_activations(lm.params, lm.config, lm.tokenizer, dataset.prompts, sites,
                                              max_seq_len=max_seq_len, batch_tokens=batch_tokens, progress=progress)
        seconds["forward"] += time.perf_counter() - start
        seconds["forward_cpu"] += time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        for s_site in sites:
            here = [s for s in saes if s["site"] == s_site]
            result = probing.probe_dataset(acts[s_site], dataset.labels, train, test, [s["params"] for s in here],
                                           ks, seed)
            for s, k_result in zip(here, result["saes"]):
                error = result["baseline"].get("error") or k_result.get("error")
                entry = {"dataset": name, "n_train": len(train), "n_test": len(test)}
                entry.update({"error": error} if error else {"k": k_result, "baseline": result["baseline"]})
                if error:
                    print(f"probe: {s['sae']}: no probe on {name}: {error}", file=sys.stderr)
                s["per_dataset"].append(entry)
        seconds["probes"] += time.perf_counter() - start
        seconds["probes_cpu"] += time.process_time() - cpu
    records = []
    for s in saes:
        fitted = [e for e in s["per_dataset"] if "error" not in e]
        failed = {e["dataset"]: e["error"] for e in s["per_dataset"] if "error" in e}
        records.append({"sae": s["sae"], "site": str(s["site"]), "datasets": len(fitted),
                        "k": probing.mean_metrics([e["k"] for e in fitted]),
                        "baseline": probing.mean_metrics([e["baseline"] for e in fitted]),
                        "skipped": {**skipped, **failed}, "target_l0": s["target_l0"],
                        "per_dataset": s["per_dataset"], "seconds": dict(seconds)})
    for record in records:
        print(probe_report.text_table(record), file=sys.stderr)
        print(json.dumps(json_ready({k: record[k] for k in PRINTED})), flush=True)
    if out:
        print(f"probing: {probe_report.write(records, out)}", file=sys.stderr)
    return records
