"""A feature browser for one SAE: what each latent fires on, as a static site that opens from disk.

    python -m gemma_scope.browse --sae=PATH --model=gemma3_270m --out=DIR [--tokens=N] [--site=res.8]

One pass of the model over N held-out corpus tokens, with the SAE encoding the activations of its site, records
per latent its firing frequency, mean and maximum activation, a log2 histogram of its activations, its top-k
activating contexts, a uniform random sample of the tokens it fires on and, for ``res`` sites, the output tokens
its decoder direction promotes and suppresses (``evaluation.latents``). ``DIR/index.html`` shows them
(``evaluation.latent_site``): a sortable, searchable list of the latents with dead and dense ones flagged
(``--dense_frequency``, 10% by default), and one latent's contexts, histogram and tokens on click.
"""

from __future__ import annotations

import pathlib

from gemma_scope import cli, model, release
from gemma_scope.evaluation.latent_site import DENSE_FREQUENCY, piece_text, write_site
from gemma_scope.evaluation.latents import collect, logit_effects
from gemma_scope.files import check_output_dir


def browse(sae_path: str | pathlib.Path, out: str | pathlib.Path, *, model_name: str = "gemma3_270m",
           site: str | None = None, corpus: str | None = None, num_tokens: int = 65_536, seq_len: int = 256,
           lm_batch_size: int = 8, k: int = 20, seed: int = 0,
           dense_frequency: float = DENSE_FREQUENCY) -> pathlib.Path:
    """Runs `collect` over the first ``num_tokens`` held-out tokens (rounded down to whole batches of sequences of
    ``seq_len``, packed as in training) and writes the site (`write_site`); returns the path of ``index.html``.

    Raises:
      ValueError / FileNotFoundError: as `release.load_sae`, `collect`, and the corpus reader (missing corpus, too few
      held-out tokens). NotADirectoryError / PermissionError: ``out`` cannot be written. All that can be checked
      before the model loads is.
    """
    from gemma_scope.data.reader import SequenceReader
    from gemma_scope.data.store import read_manifest

    check_output_dir(out, "--out")
    if k < 1:
        raise ValueError(f"--top_k must be >= 1 (top-activating contexts kept per latent), got {k}")
    sae_file, sae_params, sae_site = release.load_sae(sae_path, site)
    if (config := model.config_of(model_name)) is not None:
        config.check_site(sae_site, sae_params["W_enc"].shape[0], "SAE input")
    read_manifest(corpus)  # a missing corpus, too, is named before the model loads
    lm = model.load(model_name)
    reader = SequenceReader(corpus, split="heldout", seq_len=seq_len, tokenizer=lm.tokenizer)
    num_sequences = min(max(1, num_tokens // seq_len), reader.sequences_per_epoch)
    batch = min(lm_batch_size, num_sequences)
    held_out = reader.sequences(0, num_sequences - num_sequences % batch)  # whole batches: one compile
    tokens, mask = held_out["tokens"], held_out["mask"]
    batches = [(tokens[i:i + batch], mask[i:i + batch]) for i in range(0, len(tokens), batch)]
    stats = collect(lm.params, lm.config, batches, sae_site, sae_params, k=k, seed=seed)
    promoted = logit_effects(lm.params, lm.config, sae_params["W_dec"]) if sae_site.kind == "res" else None
    meta = {"SAE": str(sae_file), "model": str(model_name), "site": str(sae_site), "width": len(stats.count),
            "held-out tokens": int(stats.tokens)}
    return write_site(out, stats, tokens, piece_text(lm.tokenizer), promoted=promoted, meta=meta,
                      title=f"{sae_site} SAE latents", dense_frequency=dense_frequency)


def main(argv: list[str] | None = None) -> pathlib.Path:
    """``python -m gemma_scope.browse``: writes the browser and prints the path of its index.html."""
    parser = cli.parser("python -m gemma_scope.browse", __doc__.split("\n\n")[0])
    parser.add_argument("--sae", required=True, help="params.npz, SAE directory or SAELens directory (one SAE)")
    parser.add_argument("--model", default="gemma3_270m", help="registry name (gemma3_270m), HF dir or orbax path")
    parser.add_argument("--out", required=True, help="directory for the site (index.html and data/)")
    parser.add_argument("--tokens", type=int, default=65_536, help="held-out tokens to run (whole sequences)")
    parser.add_argument("--site", help="site the SAE reads, e.g. res.8 (default: from the SAE's release path)")
    parser.add_argument("--corpus", help="built corpus directory (default: $GEMMA_SCOPE_CORPUS or ./corpus)")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per held-out sequence")
    parser.add_argument("--lm_batch_size", type=int, default=8, help="sequences per LM batch")
    parser.add_argument("--top_k", type=int, default=20, help="top-activating contexts kept per latent")
    parser.add_argument("--dense_frequency", type=float, default=DENSE_FREQUENCY,
                        help="flag latents firing on more than this fraction of tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random contexts")
    args = parser.parse_args(argv)
    if args.tokens < args.seq_len:
        parser.error(f"--tokens={args.tokens} is less than one sequence (--seq_len={args.seq_len})")
    index = browse(args.sae, args.out, model_name=args.model, site=args.site, corpus=args.corpus,
                   num_tokens=args.tokens, seq_len=args.seq_len, lm_batch_size=args.lm_batch_size, k=args.top_k,
                   seed=args.seed, dense_frequency=args.dense_frequency)
    print(index)
    return index


if __name__ == "__main__":
    cli.run(main)
