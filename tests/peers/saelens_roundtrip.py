"""Runs in the peer venv (torch + sae-lens, no JAX): loads each SAE directory given with SAELens's own
``SAE.load_from_disk`` and writes what SAELens sees and computes, for ``tests/test_saelens_peer.py``.

    PEER_PYTHON tests/peers/saelens_roundtrip.py OUT.json DIR:ACTS.npy [DIR:ACTS.npy ...]

For each pair: the config SAELens parsed (class, architecture, d_in, d_sae, dtype, apply_b_dec_to_input,
normalize_activations, reshape_activations, metadata model_name / hook_name / context_size / prepend_bos), and
``encode(x)`` and ``decode(encode(x))`` on the activations, saved as ``DIR/saelens_out.npz`` (feats, recons).
"""

import json
import pathlib
import sys

import numpy as np
import torch
from sae_lens import SAE, __version__

out = {"sae_lens": __version__, "torch": torch.__version__, "saes": {}}
for arg in sys.argv[2:]:
    directory, acts = arg.rsplit(":", 1)
    sae = SAE.load_from_disk(directory)
    x = torch.from_numpy(np.load(acts))
    with torch.no_grad():
        feats = sae.encode(x)
        recons = sae.decode(feats)
    np.savez(pathlib.Path(directory) / "saelens_out.npz", feats=feats.numpy(), recons=recons.numpy())
    cfg, meta = sae.cfg, sae.cfg.metadata
    out["saes"][directory] = {
        "class": type(sae).__name__, "architecture": cfg.architecture(), "d_in": cfg.d_in, "d_sae": cfg.d_sae,
        "dtype": cfg.dtype, "param_dtype": str(sae.W_enc.dtype), "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations, "reshape_activations": cfg.reshape_activations,
        **{k: meta.get(k) for k in ("model_name", "hook_name", "context_size", "prepend_bos", "hook_head_index")},
    }
pathlib.Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
