"""Cross-entropy of a text under a Gemma model: ``python -m gemma_scope.score --model=gemma3_270m --text_file=FILE``.

Prints one JSON line ``{"model": …, "tokens": N, "nats_per_token": X, "total_nats": …, "windows": W}``: the mean
next-token cross-entropy (nats) over the text's N tokens. Texts longer than ``--max_length`` are cut into
consecutive windows, each with BOS prepended; BOS is never predicted.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gemma_scope import cli, model
from gemma_scope.files import utf8_text


def score_ids(lm: model.LoadedModel, ids: list[int], max_length: int = 1024, batch_size: int = 4) -> dict:
    """Scores token ids (no BOS) in windows of at most ``max_length`` tokens including BOS.

    Returns {"tokens": N, "nats_per_token": mean NLL, "total_nats": summed NLL, "windows": W}.

    Raises:
      ValueError: no tokens, or ``max_length`` < 2.
    """
    if not ids:
        raise ValueError("nothing to score: the text encodes to no tokens")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (BOS plus one token), got {max_length}")
    tok, cfg = lm.tokenizer, lm.config
    step = max_length - 1
    windows = [[tok.bos_id] + ids[i:i + step] for i in range(0, len(ids), step)]
    length = max(map(len, windows))
    tokens = np.full((len(windows), length), tok.pad_id, np.int32)
    mask = np.zeros((len(windows), length), bool)
    for row, window in enumerate(windows):
        tokens[row, :len(window)] = window
        mask[row, :len(window)] = True
    nll_fn = jax.jit(lambda p, t, m: model.token_nll(p, cfg, t, attention_mask=m))
    total = 0.0
    for start in range(0, len(windows), batch_size):
        t, m = tokens[start:start + batch_size], mask[start:start + batch_size]
        nll = nll_fn(lm.params, jnp.asarray(t), jnp.asarray(m))
        total += float(jnp.sum(jnp.where(m[:, 1:], nll, 0.0)))
    return {"tokens": len(ids), "nats_per_token": total / len(ids), "total_nats": total, "windows": len(windows)}


def read_text(path: pathlib.Path) -> str:
    """The UTF-8 text of a file (``-``: stdin). Raises ValueError naming the file and byte offset if it is not
    UTF-8."""
    if str(path) == "-":
        return utf8_text(sys.stdin.buffer.read(), "<stdin>")
    return utf8_text(path.read_bytes(), path)


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser("python -m gemma_scope.score", "Mean next-token cross-entropy (nats/token) of a text.")
    parser.add_argument("--model", default="gemma3_270m",
                        help="'gemma3_270m' (embedded), a .gguf file, a Hugging Face directory or an orbax checkpoint")
    parser.add_argument("--text_file", "--text-file", required=True, type=pathlib.Path, help="UTF-8 text file ('-' for stdin)")
    parser.add_argument("--max_length", "--max-length", type=int, default=1024, help="tokens per window, BOS included")
    args = parser.parse_args(argv)
    if args.max_length < 2:
        parser.error(f"--max_length must be >= 2 (BOS plus one token), got {args.max_length}")
    if args.text_file.is_dir():
        raise IsADirectoryError(f"--text_file {args.text_file} is a directory; expected a UTF-8 text file")
    if str(args.text_file) != "-" and not args.text_file.is_file():
        raise FileNotFoundError(f"--text_file {args.text_file} does not exist")
    text = read_text(args.text_file)
    if not text:  # checked before the model loads
        raise ValueError(f"nothing to score: {'stdin' if str(args.text_file) == '-' else args.text_file} is empty")
    lm = model.load(args.model)
    result = score_ids(lm, lm.tokenizer.encode(text), args.max_length)
    print(json.dumps({"model": str(args.model), **result}))


if __name__ == "__main__":
    cli.run(main)
