"""Run by tests/test_release_circuit_tracer.py in a venv with the ``circuit-tracer`` package (never imported by the
test suite itself): loads our files with circuit-tracer's own loaders and writes their outputs on given inputs.

    python tests/circuit_tracer_check.py NATIVE_CLT_DIR TRANSCODER_SET_DIR GS2_CLT_DIR INPUTS.npy OUT.npz
"""

import pathlib
import sys

import numpy as np
import torch
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt, load_gemma_scope_2_clt
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
from safetensors.torch import load_file

native, tset, gs2, inputs, out = map(pathlib.Path, sys.argv[1:])
x = torch.from_numpy(np.load(inputs))  # [n_layers, positions, d_model]
n = x.shape[0]
cpu = torch.device("cpu")
with torch.no_grad():
    clt = load_clt(str(native), feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
                   device=cpu, dtype=torch.float32, lazy_decoder=False)
    assert clt.W_skip is None  # circuit-tracer's loader drops skip weights: they come from our sidecar
    clt.W_skip = torch.nn.Parameter(load_file(native / "W_skip.safetensors")["W_skip"])
    # CrossLayerTranscoder.forward (0.5.0) calls decode without the inputs its skip needs, so decode directly
    native_out = clt.decode(clt.encode(x).to_sparse(), input_acts=x)
    ts = load_transcoder_set({i: str(tset / f"layer_{i}.safetensors") for i in range(n)}, scan="test",
                             feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out", device=cpu,
                             dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
    set_out = torch.stack([tc(x[i]) for i, tc in enumerate(ts.transcoders)])
    # load_gemma_scope_2_clt (0.5.0) loads the files of layers range(max(paths)): one layer short for paths keyed
    # 0..n-1, so a dummy key n makes it load all n.
    paths = {i: str(gs2 / f"params_layer_{i}.safetensors") for i in range(n)} | {n: ""}
    gs2_clt = load_gemma_scope_2_clt(paths, device=cpu, dtype=torch.float32)
    gs2_out = gs2_clt.decode(gs2_clt.encode(x).to_sparse(), input_acts=x)
np.savez(out, native=native_out.numpy(), set=set_out.numpy(), gs2=gs2_out.numpy())
