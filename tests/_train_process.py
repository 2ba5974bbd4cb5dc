"""One process of a multi-process training run on CPU, for tests/test_multiprocess.py:

    python tests/_train_process.py PROCESS_ID NUM_PROCESSES PORT DEVICES CONFIG_OVERRIDES_JSON

Starts JAX with DEVICES CPU devices, joins the job through a coordinator on 127.0.0.1:PORT (gloo collectives),
then trains ``experiments/from_activations.py`` with the overrides and ``mesh.distributed=True``.
"""

import importlib.util
import json
import os
import pathlib
import sys

process_id, num_processes, port, devices = map(int, sys.argv[1:5])
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if num_processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)

from gemma_scope import train  # noqa: E402

spec = importlib.util.spec_from_file_location("from_activations", ROOT / "experiments/from_activations.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
for key, value in json.loads(sys.argv[5]).items():
    *sections, name = key.split(".")
    node = config[sections[0]] if sections else config
    node[name] = tuple(value) if isinstance(value, list) else value
config.mesh.distributed = num_processes > 1
print(f"processes={jax.process_count()} devices={jax.device_count()}")
for path in train.run(config):
    print(path)
