"""Site activations for the step: the source protocol, the model source (one LM pass → many sites) and the npy
shard source (``sources``), their shuffle buffers on the devices (``buffers``), the shard format on disk
(``shards``), and the ``python -m gemma_scope.activations`` command (``__main__``)."""

from gemma_scope.activations.shards import STORAGE_DTYPES, first_rows, open_shards, write_shards
from gemma_scope.activations.sources import (
    ActivationSource,
    ModelSource,
    NpyShardSource,
    group_sites,
    make_source,
)
