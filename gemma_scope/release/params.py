"""A released SAE or transcoder in memory, whatever its layout on disk (``release.gs1``: Gemma Scope 1 and
SAELens; ``release.gs2``: Gemma Scope 2): the checks every writer and reader applies to its arrays, the name of
its width, and the readers of the files that hold them, with errors that name the file.

In memory a released SAE or transcoder is a dict of float32 arrays ``W_enc [d_in, M]``, ``W_dec [M, d_out]``,
``b_enc [M]``, ``b_dec [d_out]``, ``threshold [M]`` and, for a transcoder with an affine skip, ``W_skip [d_in,
d_out]``; normalisation and the pre-encoder bias are folded in, so on raw activations
``pre = x @ W_enc + b_enc; f = (pre > threshold) * relu(pre); y_hat = f @ W_dec + b_dec (+ x @ W_skip)``.
An SAE reads and reconstructs one site (``d_out = d_in``); a transcoder reads ``mlp_in.L`` and predicts ``mlp.L``.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import safetensors.numpy

from gemma_scope.sae import PARAM_KEYS

SKIP_KEY = "W_skip"  # a transcoder's affine skip connection [d_in, d_out] (Gemma Scope 2)
# Our model registry names (``gemma_scope.model``) as TransformerLens / SAELens / SAEBench name the models: the names
# of SAELens's pretrained_saes.yaml (Gemma Scope: "gemma-2-2b"; Gemma Scope 2: "google/gemma-3-270m", which is also
# the Hugging Face id). A checkpoint path or another name is written as given.
PEER_MODEL_NAMES = {"gemma2_2b": "gemma-2-2b", "gemma2_9b": "gemma-2-9b", "gemma2_27b": "gemma-2-27b",
                    "gemma3_270m": "google/gemma-3-270m", "gemma3_1b": "google/gemma-3-1b-pt"}


def peer_model_name(model: str | None) -> str | None:
    """The TransformerLens/SAELens name of one of our models (``PEER_MODEL_NAMES``), else ``model`` unchanged."""
    return PEER_MODEL_NAMES.get(model, model) if model else model


def width_label(width: int) -> str:
    """Gemma Scope's name for an SAE width M: ``2**14 -> "16k"``, ``2**16 -> "65k"``, ``2**20 -> "1m"``.

    Widths ``1024 * 2**k`` are named by thousands (millions from 2**20), rounded down, as in the release's
    ``width_16k ... width_524k, width_1m``; any other width is written in full (``1536 -> "1536"``).

    Raises:
      ValueError: width not a positive integer.
    """
    if not isinstance(width, (int, np.integer)) or width <= 0:
        raise ValueError(f"SAE width must be a positive integer, got {width!r}")
    width = int(width)
    multiple, remainder = divmod(width, 1024)
    if remainder or multiple & (multiple - 1):
        return str(width)
    return f"{width // 1_000_000}m" if width >= 2**20 else f"{width // 1000}k"


def validate_params(params: dict[str, np.ndarray], source: str, *, transcoder: bool = False,
                    names: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Checks SAE or transcoder parameters and returns their arrays as float32 (extra keys dropped).

    Expected: ``W_enc [d_in, M]``, ``W_dec [M, d_out]``, ``b_enc [M]``, ``b_dec [d_out]``, ``threshold [M]`` and,
    for a transcoder only, optionally ``W_skip [d_in, d_out]``; ``d_out = d_in`` for an SAE. Floating dtypes, all
    finite, ``threshold >= 0``.

    Args:
      params: arrays under our key names.
      source: what to name in messages (a file path).
      transcoder: whether d_out may differ from d_in and ``W_skip`` may be present.
      names: the file's spelling of each key for messages (e.g. ``GS2_TENSORS``); default ours.

    Raises:
      ValueError: naming ``source``, the offending key and what was expected.
    """
    name = lambda key: repr((names or {}).get(key, key))  # noqa: E731
    keys = PARAM_KEYS + ((SKIP_KEY,) if SKIP_KEY in params else ())
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise ValueError(f"{source}: missing key(s) {[(names or {}).get(k, k) for k in missing]}; an SAE needs "
                         f"{[(names or {}).get(k, k) for k in PARAM_KEYS]} (has {sorted(params)})")
    if SKIP_KEY in params and not transcoder:
        raise ValueError(f"{source}: key {name(SKIP_KEY)} is an affine skip connection; expected one only in a "
                         "transcoder (an SAE reconstructs its input without one)")
    for key in keys:
        if not np.issubdtype(params[key].dtype, np.floating):
            raise ValueError(f"{source}: key {name(key)} has dtype {params[key].dtype}; expected a float dtype")
    for key, what in (("W_enc", "[d_in, width]"), ("W_dec", "[width, d_out]")):
        if params[key].ndim != 2:
            raise ValueError(f"{source}: key {name(key)} has shape {params[key].shape}; expected 2-D {what}")
    d_in, width = params["W_enc"].shape
    d_out = params["W_dec"].shape[1] if transcoder else d_in
    expected = {"W_enc": (d_in, width), "W_dec": (width, d_out), "b_enc": (width,), "b_dec": (d_out,),
                "threshold": (width,), SKIP_KEY: (d_in, d_out)}
    for key in keys:
        if params[key].shape != expected[key]:
            raise ValueError(
                f"{source}: key {name(key)} has shape {params[key].shape}; expected {expected[key]} "
                f"(d_in={d_in}, width={width} from {name('W_enc')} {params['W_enc'].shape}"
                + (f", d_out={d_out} from {name('W_dec')})" if transcoder else ")")
            )
    out = {k: np.asarray(params[k], dtype=np.float32) for k in keys}
    for key, value in out.items():
        if not np.isfinite(value).all():
            raise ValueError(f"{source}: key {name(key)} holds {np.size(value) - np.isfinite(value).sum()} "
                             "non-finite values")
    if (out["threshold"] < 0).any():
        raise ValueError(f"{source}: key {name('threshold')} has negative entries (min {out['threshold'].min()}); "
                         "expected >= 0")
    return out


def check_average_l0(average_l0: float) -> None:
    """Raises ValueError unless ``average_l0`` (a mean L0 naming a release directory) is finite and >= 0."""
    if not (math.isfinite(average_l0) and average_l0 >= 0):
        raise ValueError(f"average_l0 must be a finite number >= 0, got {average_l0!r}")


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file of SAE parameters. Raises ValueError naming the file if it is unreadable."""
    try:
        return safetensors.numpy.load_file(path)
    except Exception as e:  # safetensors raises several types for corrupt files; report them uniformly.
        raise ValueError(f"{path}: cannot read SAE parameters ({type(e).__name__}: {e})") from e


def read_json(path: pathlib.Path) -> dict:
    """A JSON object from ``path``. Raises ValueError (FileNotFoundError if absent) naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; expected it next to the SAE's parameters")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8 or not JSON
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def tensor_shape(raw: dict[str, np.ndarray], key: str, file: pathlib.Path, what: str | None = None) -> tuple:
    """The shape of ``raw[key]`` read from ``file``; ``what`` (e.g. ``"[d_model, width]"``) names its expected
    form, and its rank is checked when given as ``[a, b, ...]``.

    Raises:
      ValueError: naming the file and the key: the key is missing, or its rank is not ``what``'s.
    """
    if key not in raw:
        raise ValueError(f"{file}: missing key {key!r}" + (f" {what}" if what else "") + f" (has {sorted(raw)})")
    shape = raw[key].shape
    if what and what.startswith("[") and len(shape) != what.count(",") + 1:
        raise ValueError(f"{file}: key {key!r} has shape {shape}; expected {what}")
    return shape


def check_tensors(raw: dict[str, np.ndarray], expected: dict[str, tuple], file: pathlib.Path, where: str) -> None:
    """Checks the arrays read from one file: exactly the keys of ``expected``, each of its shape, a float dtype,
    finite, and ``threshold`` (if expected) ``>= 0``; ``where`` says where the expected sizes come from.

    Raises:
      ValueError: one line naming the file, the key and the expected shape.
    """
    for key, shape in expected.items():
        value = raw.get(key)
        if value is None:
            raise ValueError(f"{file}: missing key {key!r}; expected shape {shape} ({where}; has {sorted(raw)})")
        if value.shape != shape:
            raise ValueError(f"{file}: key {key!r} has shape {value.shape}; expected {shape} ({where})")
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{file}: key {key!r} has dtype {value.dtype}; expected a float dtype")
        if not np.isfinite(value).all():
            raise ValueError(f"{file}: key {key!r} {shape} holds {value.size - np.isfinite(value).sum()} "
                             "non-finite values")
    extra = sorted(set(raw) - set(expected))
    if extra:
        raise ValueError(f"{file}: unexpected key(s) {extra}; expected exactly {sorted(expected)} ({where})")
    if "threshold" in expected and (raw["threshold"] < 0).any():
        raise ValueError(f"{file}: key 'threshold' has negative entries (min {raw['threshold'].min()}); "
                         "expected >= 0")
