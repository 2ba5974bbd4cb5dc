"""The training loss of an SAE or transcoder (``sae``'s params, training convention): a reconstruction term (the
plain one through ``sae.reconstruction_and_l0``'s hand-written backward pass, or Matryoshka's nested prefixes) plus
the sparsity terms from the latents' firing frequencies on the batch: the paper's λ·L0 (Gemma Scope Eq. 4), a
quadratic pull towards a target L0, and a frequency penalty on latents that fire too often (Gemma Scope 2 style).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma_scope.sae import autoencoder as sae

SPARSITY_LOSSES = ("l0", "target_l0")  # λ·L0 (Gemma Scope Eq. 4) | c·(L0/target − 1)² (Gemma Scope 2 style)
DEFAULT_FREQUENCY_THRESHOLD = 0.1  # firing frequency above which the frequency penalty acts (our choice)


def sparsity_penalty(
    frequencies: jax.Array,
    l0_coefficient: jax.Array | float,
    sparsity_loss: str = "l0",
    target_l0: jax.Array | float = 1.0,
    frequency_coefficient: jax.Array | float = 0.0,
    frequency_threshold: float = DEFAULT_FREQUENCY_THRESHOLD,
) -> tuple[jax.Array, jax.Array]:
    """The sparsity terms of the loss from the latents' firing frequencies; returns ``(penalty, l0)``.

    With ``p_i = mean_B H(z_i − θ_i)`` (``frequencies``) and ``L0 = Σ_i p_i``:

    - ``"l0"``: ``λ · L0`` (Gemma Scope Eq. 4).
    - ``"target_l0"``: ``λ · (L0 / target_l0 − 1)²``, the form of dictionary_learning's ``JumpReluTrainer``
      (saprmarks/dictionary_learning, ``trainers/jumprelu.py``: ``sparsity_coefficient · (l0 / target_l0 − 1)²``
      on the batch-mean L0). Gemma Scope 2 announces "a quadratic L0 penalty" towards a target L0; this is not
      taken from Gemma Scope 2 but is dictionary_learning's published form (a deviation wherever the two
      differ). The gradient changes sign at the target, so Adam's normalisation (which makes λ·L0 a
      near-constant push, SAELens issue #719) cannot wash it out. One deviation from dictionary_learning: its
      step is taken on the JumpReLU output, ours on the pre-activations z (as the JumpReLU paper and Gemma Scope
      Eq. 4 do).
    - plus, if ``frequency_coefficient > 0``, the frequency penalty ``c_f · Σ_i max(0, p_i − p_max)`` against
      high-frequency latents (Gemma Scope 2 announces a frequency penalty without its form; this linear hinge is
      OUR choice: a latent firing on more than ``p_max`` of the tokens gets an extra L0 penalty of ``c_f`` on its
      own threshold, latents below ``p_max`` are untouched, so the penalty does not fight the L0 target).

    Gradients reach θ through the ``sae.step`` pseudo-derivative of each ``p_i`` (JumpReLU paper Eq. 12).

    Args:
      frequencies: float32 ``[M]``, fraction of the batch's tokens on which each latent fired.
      l0_coefficient: λ ≥ 0 (may be traced: the warmup scales it).
      sparsity_loss: one of ``SPARSITY_LOSSES`` (static).
      target_l0: target mean L0 > 0 (``"target_l0"`` only; may be traced).
      frequency_coefficient: c_f ≥ 0 (may be traced).
      frequency_threshold: p_max in (0, 1].

    Raises:
      ValueError: an unknown ``sparsity_loss``.
    """
    l0 = jnp.sum(frequencies)
    if sparsity_loss == "l0":
        penalty = l0_coefficient * l0
    elif sparsity_loss == "target_l0":
        penalty = l0_coefficient * (l0 / target_l0 - 1.0) ** 2
    else:
        raise ValueError(f"sparsity_loss must be one of {SPARSITY_LOSSES}, got {sparsity_loss!r}")
    penalty = penalty + frequency_coefficient * jnp.sum(jax.nn.relu(frequencies - frequency_threshold))
    return penalty, l0


def matryoshka_bounds(prefixes: tuple[int, ...], width: int) -> tuple[int, ...]:
    """The Matryoshka prefix sizes, strictly increasing and ending at ``width`` (appended if missing).

    Raises:
      ValueError: sizes not strictly increasing integers in ``[1, width]``.
    """
    prefixes = tuple(prefixes)
    if (not all(isinstance(m, int) and 0 < m <= width for m in prefixes)
            or any(a >= b for a, b in zip(prefixes, prefixes[1:]))):
        raise ValueError(f"matryoshka_prefixes must be strictly increasing integers in [1, width={width}], "
                         f"got {prefixes}")
    return prefixes if prefixes and prefixes[-1] == width else (*prefixes, width)


def _matryoshka_reconstruction(params: dict, x: jax.Array, y: jax.Array, bounds: tuple[int, ...], bandwidth: float,
                               compute_dtype, transcoder: bool) -> tuple[jax.Array, jax.Array]:
    """``(mse [len(bounds)], frequencies [M])``: the squared error against the target ``y`` (``x`` for an SAE) of
    each nested prefix's reconstruction ``ŷ_m = f[:, :m] @ W_dec[:m] + b_dec (+ x @ W_skip)`` and the latents'
    firing frequencies.

    Plain autodiff through ``sae.jumprelu`` and ``sae.step`` (not the hand-written backward pass of the plain
    loss); the prefixes are decoded cumulatively, so the decoder matmuls cost one full decode.
    """
    z = sae.pre_activations_train(params, x, compute_dtype, transcoder)
    f = sae.jumprelu(z, params["threshold"], bandwidth)
    frequencies = jnp.mean(sae.step(z, params["threshold"], bandwidth), axis=0)
    y32 = y.astype(jnp.float32)
    y_hat, start, mses = params["b_dec"], 0, []
    if "W_skip" in params:
        y_hat = y_hat + sae.matmul(x, params["W_skip"], compute_dtype)
    for end in bounds:
        y_hat = y_hat + sae.matmul(f[:, start:end], params["W_dec"][start:end], compute_dtype)
        mses.append(jnp.mean(jnp.sum((y32 - y_hat) ** 2, axis=-1)))
        start = end
    return jnp.stack(mses), frequencies


def loss(
    params: dict,
    x: jax.Array,
    l0_coefficient: jax.Array | float,
    bandwidth: float = sae.DEFAULT_BANDWIDTH,
    compute_dtype=jnp.float32,
    *,
    sparsity_loss: str = "l0",
    target_l0: jax.Array | float = 1.0,
    frequency_coefficient: jax.Array | float = 0.0,
    frequency_threshold: float = DEFAULT_FREQUENCY_THRESHOLD,
    matryoshka_prefixes: tuple[int, ...] = (),
    y: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Gemma Scope loss (Eq. 4) ``mean_batch ||x − x̂||² + λ · mean_batch Σ_i H(z_i − θ_i)``, or a Gemma Scope 2
    style recipe: another sparsity term, a frequency penalty (``sparsity_penalty``), a Matryoshka reconstruction.
    For a transcoder (``y`` given) the reconstruction term is ``mean_batch ||y − ŷ||²`` with ŷ of ``sae``'s module
    docstring (the transcoder loss of arXiv 2406.11944 §3, with the same sparsity terms as an SAE).

    The L0 term is taken on the pre-activations z through ``sae.step`` (trains θ only); the reconstruction goes
    through ``sae.jumprelu``. Without Matryoshka the backward pass is written by hand (same gradients, every large
    matmul in the layout XLA's CPU backend runs fastest; see ``sae.reconstruction_and_l0``).

    Matryoshka (Bussmann et al. 2025, arXiv 2503.17547, Eq. 2): with ``matryoshka_prefixes = (m_1, ..., m_k)``
    (``matryoshka_bounds`` appends the full width) the reconstruction term is the MEAN over prefixes of
    ``||x − (f[:m] @ W_dec[:m] + b_dec)||²``, so the first latents must reconstruct on their own. The paper sums
    over prefixes; the mean (our choice) keeps the reconstruction on the scale of the plain loss, so the same
    sparsity coefficients apply with and without it. No auxiliary loss (the paper's is for BatchTopK).

    Args:
      params: single-SAE or transcoder params (training convention).
      x: normalised activations ``[B, d]`` (float32 or bfloat16).
      l0_coefficient: λ ≥ 0, scalar (may be traced).
      bandwidth: ε (static).
      compute_dtype: matmul input dtype.
      sparsity_loss, target_l0, frequency_coefficient, frequency_threshold: see ``sparsity_penalty``.
      matryoshka_prefixes: nested prefix sizes (static); empty: the plain reconstruction.
      y: a transcoder's normalised target activations ``[B, d]`` (cast to x's dtype); None for an SAE.

    Returns:
      ``(loss, aux)``: scalar float32 loss; aux float32 scalars ``mse`` (mean squared error of the full
      dictionary, summed over d), ``fvu`` (squared error / squared distance to the batch mean of the target),
      ``l0`` (mean active latents), and ``fired`` bool ``[M]`` (latent active on some token of the batch).

    Raises:
      ValueError: an unknown ``sparsity_loss`` or bad ``matryoshka_prefixes``.
    """
    target = x if y is None else y.astype(x.dtype)
    if matryoshka_prefixes:
        bounds = matryoshka_bounds(matryoshka_prefixes, params["W_dec"].shape[0])
        mses, frequencies = _matryoshka_reconstruction(params, x, target, bounds, bandwidth, compute_dtype,
                                                       y is not None)
        reconstruction, mse = jnp.mean(mses), mses[-1]
    else:
        mse, frequencies = sae.reconstruction_and_l0(params, x, target, bandwidth, compute_dtype, y is not None)
        reconstruction = mse
    penalty, l0 = sparsity_penalty(frequencies, l0_coefficient, sparsity_loss, target_l0, frequency_coefficient,
                                   frequency_threshold)
    target = target.astype(jnp.float32)
    variance = jnp.mean(jnp.sum((target - target.mean(axis=0)) ** 2, axis=-1))
    return reconstruction + penalty, {"mse": mse, "fvu": mse / variance, "l0": l0, "fired": frequencies > 0}
