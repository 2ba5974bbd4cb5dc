"""Steering with an SAE latent: generation with and without ``alpha × W_dec[i]`` added at the SAE's site.

    python -m gemma_scope.steer --sae=PATH --latent=I --alpha=A --prompt=TEXT [--tokens=K] [--temperature=T --seed=S]

The latent's decoder row (in raw activation units, as released: `gemma_scope.release`) is added, times alpha, to
the site's activation at every position of every forward pass, BOS and prompt included, as activation steering
does (Gemma Scope, arXiv 2408.05147 §5, "steering"; Templeton et al. 2024 clamp latents instead, which needs the
SAE's reconstruction error term). Alpha is therefore in the units of the latent's activation: the browser's
"max activation" of a latent is a natural scale. Both generations are greedy, or sampled at ``--temperature``
from the same random stream (``--seed``), so that they differ only by the steering; they print side by side.
"""

from __future__ import annotations

import itertools
import math
import shutil
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from gemma_scope import cli, model, release
from gemma_scope.model.forward import Replacement
from gemma_scope.sites import Site


def generate(lm_params: dict, cfg: model.Config, prompt: list[int], num_tokens: int, *,
             replace: dict[Site, Replacement] | None = None, temperature: float = 0.0, seed: int = 0,
             stop_id: int | None = None) -> list[int]:
    """Continues ``prompt`` (token ids, BOS included) by ``num_tokens`` tokens; returns the new ids.

    Greedy when ``temperature`` is 0, else sampled from ``softmax(logits / temperature)`` with the key
    ``fold_in(key(seed), step)``, so two calls with the same seed draw the same uniform numbers. Each step runs the
    whole sequence in a buffer of fixed width (one compile; right padding is invisible to causal attention) with
    ``replace`` as in `model.forward`. Stops early after ``stop_id`` (e.g. EOS).

    Raises:
      ValueError: an empty prompt, a negative ``num_tokens`` or ``temperature``.
    """
    if not prompt:
        raise ValueError("the prompt holds no tokens; give at least BOS")
    if num_tokens < 0 or temperature < 0:
        raise ValueError(f"num_tokens ({num_tokens}) and temperature ({temperature}) must be >= 0")
    width = len(prompt) + num_tokens

    @jax.jit
    def next_token(params, ids, n, key):
        logits = model.forward(params, cfg, ids[None], replace=replace).logits[0, n - 1].astype(jnp.float32)
        if temperature == 0:
            return jnp.argmax(logits)
        return jax.random.categorical(key, logits / temperature)

    ids = np.zeros(width, np.int32)
    ids[:len(prompt)] = prompt
    key = jax.random.key(seed)
    for n in range(len(prompt), width):
        ids[n] = int(next_token(lm_params, jnp.asarray(ids), n, jax.random.fold_in(key, n)))
        if ids[n] == stop_id:
            return ids[len(prompt):n + 1].tolist()
    return ids[len(prompt):].tolist()


def steering(site: Site, direction: np.ndarray, alpha: float) -> dict[Site, Replacement]:
    """The replacement adding ``alpha * direction`` (float32 [width of the site]) at every position of ``site``."""
    delta = jnp.asarray(alpha * np.asarray(direction, np.float32))
    return {site: lambda act: act + delta.astype(act.dtype)}


def check_latent(sae_params: dict, latent: int) -> None:
    """Raises ValueError unless ``latent`` indexes one of the SAE's latents (a row of ``W_dec``)."""
    width = sae_params["W_dec"].shape[0]
    if not 0 <= latent < width:
        raise ValueError(f"latent {latent} is out of range: this SAE has {width} latents (0..{width - 1})")


def steer(lm: model.LoadedModel, sae_params: dict, site: Site, latent: int, alpha: float, prompt: str,
          num_tokens: int = 32, temperature: float = 0.0, seed: int = 0) -> tuple[str, str]:
    """(plain continuation, steered continuation) of ``prompt`` with ``alpha × W_dec[latent]`` added at ``site``.

    Raises:
      ValueError: ``latent`` outside ``[0, width)``; a non-finite ``alpha``; a site beyond the model's layers or
        a decoder row whose width is not the site's.
    """
    check_latent(sae_params, latent)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")
    lm.config.check_site(site, sae_params["W_dec"].shape[1], "SAE output")
    tok = lm.tokenizer
    ids = [tok.bos_id] + tok.encode(prompt)
    run = lambda replace: tok.decode(generate(lm.params, lm.config, ids, num_tokens, replace=replace,  # noqa: E731
                                              temperature=temperature, seed=seed, stop_id=tok.eos_id))
    return run(None), run(steering(site, sae_params["W_dec"][latent], alpha))


def side_by_side(left: str, right: str, titles: tuple[str, str], width: int) -> str:
    """Two texts in columns of ``width`` characters (wrapped, newlines kept), under their titles."""
    def lines(text):
        return [row for line in text.split("\n") for row in (textwrap.wrap(line, width) or [""])]

    rows = [titles, ("-" * width, "-" * width), *itertools.zip_longest(lines(left), lines(right), fillvalue="")]
    return "\n".join(f"{a:<{width}} | {b}".rstrip() for a, b in rows)


def main(argv: list[str] | None = None) -> tuple[str, str]:
    """``python -m gemma_scope.steer``: prints the plain and the steered continuation side by side."""
    parser = cli.parser("python -m gemma_scope.steer", __doc__.split("\n\n")[0])
    parser.add_argument("--sae", required=True, help="params.npz, SAE directory or SAELens directory (one SAE)")
    parser.add_argument("--latent", type=int, required=True, help="index of the latent to steer with")
    parser.add_argument("--alpha", type=float, required=True, help="multiple of W_dec[latent] added (activation units)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate")
    parser.add_argument("--model", default="gemma3_270m", help="registry name (gemma3_270m), HF dir or orbax path")
    parser.add_argument("--site", help="site the SAE reads, e.g. res.8 (default: from the SAE's release path)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled at this temperature")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (same for both generations)")
    args = parser.parse_args(argv)
    if args.tokens < 1 or not args.temperature >= 0:
        parser.error(f"--tokens must be >= 1 and --temperature >= 0 (got {args.tokens}, {args.temperature})")
    if not math.isfinite(args.alpha):
        raise ValueError(f"--alpha must be a finite number, got {args.alpha}")
    _, sae_params, site = release.load_sae(args.sae, args.site)
    check_latent(sae_params, args.latent)  # what can be checked before the model loads
    if (config := model.config_of(args.model)) is not None:
        config.check_site(site, sae_params["W_dec"].shape[1], "SAE output")
    plain, steered = steer(model.load(args.model), sae_params, site, args.latent, args.alpha, args.prompt,
                           args.tokens, args.temperature, args.seed)
    column = max(20, min(60, (shutil.get_terminal_size().columns - 3) // 2))
    print(f"prompt: {args.prompt!r}  ({site}, latent {args.latent}, alpha {args.alpha:g})\n")
    print(side_by_side(plain, steered, ("without steering", f"with {args.alpha:g} × W_dec[{args.latent}]"), column))
    return plain, steered


if __name__ == "__main__":
    cli.run(main)
