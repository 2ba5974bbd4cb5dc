"""Released SAEs and transcoders on disk: one module per layout — Gemma Scope 1 ``params.npz`` with a SAELens copy
(``gs1``), Gemma Scope 2 (``gs2``; its CLTs and crosscoders, ``gs2_crosslayer``), circuit-tracer's CLTs and
transcoder sets (``circuit_tracer``) — the arrays every layout holds and their checks (``params``), and one reader
that takes any of them (``read``)."""

from gemma_scope.release.circuit_tracer import read_circuit_tracer, write_circuit_tracer
from gemma_scope.release.gs1 import PARAMS_FILE, SAELENS_CFG_FILE, SAELENS_WEIGHTS_FILE, sae_dir, write_sae
from gemma_scope.release.gs2 import gs2_labels, write_gs2
from gemma_scope.release.gs2_crosslayer import read_clt, read_crosscoder, write_clt, write_crosscoder
from gemma_scope.release.params import SKIP_KEY, width_label
from gemma_scope.release.read import find_saes, load_crosslayer, load_params, load_sae, sae_info
