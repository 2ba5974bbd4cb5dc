"""One process of a multi-process training run on CPU, for tests/test_multiprocess.py:

    python tests/_train_process.py PROCESS_ID NUM_PROCESSES PORT DEVICES CONFIG_OVERRIDES_JSON

Starts JAX with DEVICES CPU devices, joins the job through a coordinator on 127.0.0.1:PORT (gloo collectives;
``training.stopping.initialize`` with the overrides' ``mesh.heartbeat_timeout_s``), then trains
``experiments/from_activations.py`` with the overrides and ``mesh.distributed=True``; a preemption ends it with
the trainer's line and exit status. The override ``"_sigterm_at_seal": N`` makes process 0 send itself SIGTERM
while it seals checkpoint N (a signal during a checkpoint write); ``"_step_delay_s": S`` sleeps S seconds before each
step (so that a run outlasts JAX's preemption notice, which takes up to a second or more to reach the processes). With
``"data.source": "model"`` the activations come from a random-weight tiny Gemma 3 (``res.1``, ``res.3``) on random
token ids, each process reading its own sequences.
"""

import importlib.util
import json
import os
import pathlib
import signal
import sys
import time

process_id, num_processes, port, devices = map(int, sys.argv[1:5])
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gemma_scope import activations, model, train  # noqa: E402
from gemma_scope.sites import parse_sites  # noqa: E402
from gemma_scope.training import checkpoint, stopping  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
overrides = json.loads(sys.argv[5])
sigterm_at_seal = overrides.pop("_sigterm_at_seal", None)
step_delay_s = overrides.pop("_step_delay_s", 0)
if num_processes > 1:
    stopping.initialize(overrides.get("mesh.heartbeat_timeout_s", stopping.DEFAULT_HEARTBEAT_TIMEOUT_S),
                        coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)


class ProcessTokens:
    """Random token ids, batch k of this process a pure function of (k, process): BOS first, two pads at the end."""

    seq_len = 16

    def batch(self, index, batch_size):
        tokens = np.random.default_rng((index, jax.process_index())).integers(3, 512, (batch_size, self.seq_len))
        tokens[:, 0], tokens[:, -2:] = 2, 0
        return {"tokens": tokens.astype(np.int32), "mask": tokens > 2}

spec = importlib.util.spec_from_file_location("from_activations", ROOT / "experiments/from_activations.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
for key, value in overrides.items():
    *sections, name = key.split(".")
    node = config[sections[0]] if sections else config
    node[name] = tuple(value) if isinstance(value, list) else value
config.mesh.distributed = num_processes > 1
print(f"processes={jax.process_count()} devices={jax.device_count()}")
source = None
if config.data.source == "model":
    cfg = model.get_config("gemma3_tiny")
    lm = model.LoadedModel(cfg, model.init_params(cfg, jax.random.key(0)), make_tokenizer=lambda: None)
    source = activations.ModelSource(lm, ProcessTokens(), parse_sites("res.1,res.3", cfg.num_layers),
                                     chunk_sequences=8, forward_batch=4, passes=2, seed=config.seed)
seal = checkpoint.Checkpointer._seal


def seal_then_signal(self):
    if self._pending == sigterm_at_seal and jax.process_index() == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    seal(self)


checkpoint.Checkpointer._seal = seal_then_signal
make_train_step = train.step_lib.make_train_step


def make_slow_train_step(*args):
    train_step = make_train_step(*args)

    def slow(*step_args):
        time.sleep(step_delay_s)
        return train_step(*step_args)
    return slow


if step_delay_s:
    train.step_lib.make_train_step = make_slow_train_step
try:
    paths = train.run(config, source)
except stopping.Preempted as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_status)
for path in paths:
    print(path)
