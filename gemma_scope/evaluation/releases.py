"""Evaluating released SAE and transcoder files (Gemma Scope §4, App. C): each file's metrics on held-out text of
the corpus (the splice, ``splice.evaluate_grid``) or on cached activations (``reconstruction``), printed one JSON
line per file, with a report and plots (``report``) on request."""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from gemma_scope import model, release
from gemma_scope.activations.shards import first_rows, open_shards
from gemma_scope.evaluation.crosslayer import evaluate_crosslayer
from gemma_scope.evaluation.reconstruction import activation_metrics
from gemma_scope.evaluation.splice import evaluate_grid
from gemma_scope.files import check_output_dir, json_ready
from gemma_scope.release.params import SKIP_KEY
from gemma_scope.sites import CUSTOM, Site, transcoder_label


def _load_lm(name: str, model_config: str | None, corpus: str | None, num_sequences: int, seq_len: int, packing: str):
    """The LM (``model.load(name, config=model_config)``) and ``(tokens [N, T], mask [N, T])``: the first N
    sequences of the corpus's held-out split."""
    lm = model.load(name, config=model_config or None)
    return lm, _sequences(lm, corpus, num_sequences, seq_len, packing)


def _sequences(lm, corpus: str | None, num_sequences: int, seq_len: int, packing: str, split: str = "heldout",
               source: str | None = None) -> tuple:
    """``(tokens [N, T], mask [N, T])``: the first N sequences of a split of the corpus (of one source's documents
    when ``source`` is given), all of them when it has fewer (said on stderr)."""
    from gemma_scope.data.reader import SequenceReader

    reader = SequenceReader(corpus, split=split, seq_len=seq_len, packing=packing, tokenizer=lm.tokenizer,
                            sources=[source] if source else None)
    if num_sequences > reader.sequences_per_epoch:
        print(f"{split} split{f' of {source}' if source else ''} has only {reader.sequences_per_epoch} sequences of "
              f"{seq_len} tokens; using them all", file=sys.stderr)
        num_sequences = reader.sequences_per_epoch
    held_out = reader.sequences(0, num_sequences)
    return held_out["tokens"], held_out["mask"]


def by_source(sae_paths: list[pathlib.Path], model_name: str, *, site: str | None = None, corpus: str | None = None,
              split: str = "heldout", num_sequences: int = 8, seq_len: int = 256, packing: str = "packed",
              lm_batch_size: int = 8, model_config: str | None = None, splice: bool = True) -> list[dict]:
    """Metrics of SAEs (not transcoders) per corpus source: for every source of role "train" in the corpus
    manifest, ``evaluate_grid`` on the first ``num_sequences`` sequences of ``split`` made of that source's
    documents alone (fewer if the source has fewer). One record per source and SAE, printed as a JSON line: ``sae``,
    ``site``, ``source``, ``split``, ``l0``, ``fvu``, ``delta_lm_loss``, ``loss_recovered``, ``clean_loss``,
    ``n_tokens``, ``n_targets``. Shows which text raises L0: the README's "L0 on held-out text".
    ``splice=False`` skips the LM loss (no logits, no spliced passes: one forward pass up to the last SAE's layer
    per batch) and gives ``l0``, ``fvu``, ``n_tokens`` alone, from ``activation_metrics`` of the content tokens.

    Raises:
      ValueError: a transcoder, an SAE whose site is unknown, a corpus without train sources; as
        ``release.load_params``.
    """
    from gemma_scope.data import store

    grid, records = [], []
    for path in sae_paths:
        info = release.sae_info(path)
        if info["site_out"] != info["site"]:
            raise ValueError(f"{path}: a transcoder; by-source evaluation takes SAEs")
        if (site or info["site"]) is None:
            raise ValueError(f"{path}: cannot tell which site to splice at; pass --site (e.g. --site=res.6)")
        grid.append((Site.parse(site or info["site"]), release.load_params(path)))
    manifest = store.read_manifest(corpus if corpus is not None else store.default_corpus_dir())
    names = [name for name, entry in manifest["sources"].items() if entry["role"] == "train"]
    if not names:
        raise ValueError(f"corpus {corpus} has no source of role 'train'")
    lm = model.load(model_name, config=model_config or None)
    for name in names:
        tokens, mask = _sequences(lm, corpus, num_sequences, seq_len, packing, split, name)
        keys = ("l0", "fvu", "delta_lm_loss", "loss_recovered", "clean_loss", "n_tokens", "n_targets")
        if splice:
            results = evaluate_grid(lm.params, lm.config, tokens, mask, grid, batch_size=lm_batch_size)
        else:
            keys, results = ("l0", "fvu", "n_tokens"), _site_metrics(lm, tokens, mask, grid, lm_batch_size)
        for path, (sae_site, _), result in zip(sae_paths, grid, results):
            record = {"sae": str(path), "site": str(sae_site), "source": name, "split": split,
                      **{k: result[k] for k in keys}}
            print(json.dumps(json_ready(record)), flush=True)
            records.append(record)
    return records


def _crosslayer_records(path, params, info, lm, sequences, batch_size: int, layers_alone: bool = True) -> list[dict]:
    """``evaluate_crosslayer``'s records of a GS2 CLT or crosscoder directory, labelled: the whole dictionary's
    ``site`` reads ``"CLT mlp_in→mlp 0,1,…"`` (``+skip`` for an affine one) or ``"crosscoder res 7,13,…"``, each
    layer alone's ``"mlp_in.L→mlp.L (CLT)"`` or ``"res.L (crosscoder)"``.

    Raises:
      ValueError: naming a file of ``path``: a CLT whose ``w_dec`` layer axis is not the model's layer count, or
        covered layers or d_model that do not fit the model.
    """
    cfg, layers = lm.config, info["layers"]
    if info["kind"] == "clt" and info["n_layers"] != cfg.num_layers:
        raise ValueError(f"{path / f'params_layer_{layers[0]}.safetensors'}: key 'w_dec' has a layer axis of "
                         f"{info['n_layers']}; expected shape ({info['width']}, {cfg.num_layers}, {info['d_model']}) "
                         f"for {cfg.name}'s {cfg.num_layers} layers")
    if layers[-1] >= cfg.num_layers or info["d_model"] != cfg.d_model:
        raise ValueError(f"{path}: covers layers {layers} with d_model {info['d_model']}; {cfg.name} has layers "
                         f"0..{cfg.num_layers - 1} and d_model {cfg.d_model}")
    results = evaluate_crosslayer(lm.params, cfg, *sequences, params, layers, info["kind"], batch_size=batch_size,
                                  per_layer=layers_alone)
    skip = " +skip" if info["affine"] else ""
    whole = (f"CLT mlp_in→mlp {','.join(map(str, layers))}{skip}" if info["kind"] == "clt"
             else f"crosscoder res {','.join(map(str, layers))}")
    labels = [whole] + [f"{transcoder_label(Site('mlp_in', x), info['affine'])} (CLT)" if info["kind"] == "clt"
                        else f"res.{x} (crosscoder)" for x in layers]
    width = params["W_enc"].shape[0] * params["W_enc"].shape[2] if info["kind"] == "clt" else info["width"]
    return [{"sae": str(path), "site": label, "width": width, "kind": info["kind"],
             "l0_coefficient": info["l0_coefficient"], "target_l0": info["target_l0"]} | result
            for label, result in zip(labels, results)]


def evaluate_saes(
    sae_paths: list[pathlib.Path],
    *,
    model_name: str | None = None,
    model_config: str | None = None,
    site: str | None = None,
    corpus: str | None = None,
    packing: str = "packed",
    num_sequences: int = 64,
    seq_len: int = 1024,
    lm_batch_size: int = 8,
    activations: str | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    out: str | pathlib.Path | None = None,
    notes: str = "",
    sections: Sequence[str] = (),
    layers_alone: bool = True,
) -> list[dict]:
    """Evaluates released SAE and transcoder files, printing one JSON line of metrics per file; returns the records.

    With ``model_name`` (and ``model_config``, the architecture of an orbax checkpoint, as ``model.load``): delta LM
    loss and site metrics of all SAEs together (``evaluate_grid``) on the first ``num_sequences`` held-out sequences
    of the corpus. A transcoder's sites come from its release (``--site`` names an SAE's only); its record's
    ``site`` reads ``"mlp_in.L→mlp.L"``, with ``" +skip"`` for an affine one. With ``activations`` (a directory of
    cached ``.npy`` shards): ``activation_metrics`` on at most ``max_tokens`` of them. A CLT or crosscoder
    directory (``release.load_crosslayer``) needs ``model_name``; its records (``_crosslayer_records``; each
    covered layer alone too unless ``layers_alone`` is False) follow the SAEs'. With ``out``: ``metrics.json``,
    ``report.md`` and plots there (``notes`` goes under the report's heading, ``sections`` at its end).

    Raises:
      ValueError: neither ``model_name`` nor ``activations``; a count out of range; an SAE whose site is unknown
        when splicing; a transcoder, CLT or crosscoder with ``activations`` (one directory holds one site); a CLT
        or crosscoder that does not fit the model (``_crosslayer_records``); malformed SAE files
        (``release.load_params``) or activations (``open_shards``, NaN/Inf); a site beyond the model's layers or
        of another width than the SAE's, checked before the model loads where its config is known
        (``model.config_of``).
      NotADirectoryError / PermissionError: ``out`` cannot be written.
    """
    if not (activations or model_name):
        raise ValueError("give activations=DIR (cached activations) and/or model_name=NAME (delta LM loss)")
    for name, value, least in (("max_tokens", max_tokens, 1), ("batch_size", batch_size, 1),
                               ("num_sequences", num_sequences, 1), ("seq_len", seq_len, 2),
                               ("lm_batch_size", lm_batch_size, 1)):
        if value is not None and value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    records, saes, multi = [], [], []
    for path in sae_paths:
        info = release.sae_info(path)
        if info.get("kind") in ("clt", "crosscoder"):  # a GS2 multi-layer directory: its own passes
            if activations:
                raise ValueError(f"{path}: a {info['kind']} reads several layers; evaluate it with --model instead "
                                 "of --activations")
            params, multi_info = release.load_crosslayer(path)
            multi.append((path, params, multi_info | {k: info[k] for k in ("l0_coefficient", "target_l0")}))
            continue
        params = release.load_params(path)
        if info["site_out"] != info["site"]:  # a transcoder: its sites are in its config, never overridden
            if activations:
                raise ValueError(f"{path}: a transcoder ({info['site']} -> {info['site_out']}) needs activations of "
                                 "both sites; evaluate it with --model instead of --activations")
            sites = (info["site"], info["site_out"])
            label = transcoder_label(Site.parse(info["site"]), SKIP_KEY in params)
        else:
            if model_name and site is None and info["site"] is None:
                raise ValueError(f"{path}: cannot tell which site to splice at; pass --site (e.g. --site=res.6)")
            label = site or info["site"] or CUSTOM
            sites = (label, label)
        records.append({"sae": str(path), "site": label, "width": params["W_enc"].shape[1],
                        "l0_coefficient": info["l0_coefficient"], "target_l0": info["target_l0"]})
        saes.append((Site.parse(sites[0]) if model_name else None, params,
                     Site.parse(sites[1]) if model_name else None))
    if out:
        check_output_dir(out, "--out")
    if model_name and (config := model.config_of(model_name, model_config)) is not None:
        for record, (site_in, params, site_out) in zip(records, saes):  # before the model and the corpus load
            try:
                config.check_site(site_in, params["W_enc"].shape[0], "SAE input")
                config.check_site(site_out, params["W_dec"].shape[1], "SAE output")
            except ValueError as e:
                raise ValueError(f"{record['sae']}: {e}") from None
    if model_name:
        lm, sequences = _load_lm(model_name, model_config, corpus, num_sequences, seq_len, packing)
        for record, result in zip(records, evaluate_grid(lm.params, lm.config, *sequences, saes,
                                                          batch_size=lm_batch_size) if saes else []):
            record.update(result)
        for path, params, info in multi:
            multi_records = _crosslayer_records(path, params, info, lm, sequences, lm_batch_size, layers_alone)
            records += multi_records
            saes += [(None, None, None)] * len(multi_records)
    arrays = open_shards(activations)[0] if activations else None  # opened (and verified) once
    for record, (_, params, _) in zip(records, saes):
        if activations:
            record.update(activation_metrics(params, first_rows(arrays, max_tokens), batch_size=batch_size))
        print(json.dumps(json_ready({k: v for k, v in record.items()
                                     if k not in ("frequencies", "by_position", "by_sequence")})), flush=True)
    if out:
        from gemma_scope.evaluation import report  # matplotlib only when a report is asked for

        notes = notes or f"Model: {model_name or '–'}; activations: {activations or '–'}."
        print(f"report: {report.write_evaluation(records, out, notes, sections)}", file=sys.stderr)
    return records


def _site_metrics(lm, tokens: np.ndarray, mask: np.ndarray, grid: list, batch_size: int) -> list[dict]:
    """``activation_metrics`` of each ``(site, params)`` on the content tokens' activations (no logits)."""
    import jax

    sites = sorted({s for s, _ in grid}, key=lambda s: (s.layer, s.kind))
    forward = jax.jit(lambda p, t: model.forward(p, lm.config, t, capture=sites, logits=False).acts)
    acts = {s: [] for s in sites}
    for i in range(0, len(tokens), batch_size):
        out = forward(lm.params, tokens[i:i + batch_size])
        for s in sites:
            acts[s].append(np.asarray(out[s], np.float32)[mask[i:i + batch_size]])
    return [activation_metrics(params, np.concatenate(acts[s])) for s, params in grid]
