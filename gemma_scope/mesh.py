"""The device mesh shared by the activation sources and the trainer: a ``('data', 'model')`` mesh, the batch
sharding the sources produce and the step consumes (tokens over ``'data'``), and the model-axis size for a width
(Gemma Scope §3.3: data parallelism for narrow SAEs, latent-axis parallelism for wide ones)."""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

NARROW_WIDTH = 2**14  # Gemma Scope §3.3: pure data parallelism up to this width, latent-axis parallelism beyond


def model_axis_size(value: int | str, width: int, device_count: int) -> int:
    """The mesh's model-axis size from ``config.mesh.model``: an int, or ``"auto"``: 1 up to width
    ``NARROW_WIDTH``, else the largest divisor of the device count not above ``width / NARROW_WIDTH`` (§3.3).

    Raises:
      ValueError: neither an integer nor "auto".
    """
    if value == "auto":
        target = max(1, width // NARROW_WIDTH)
        return max(k for k in range(1, device_count + 1) if device_count % k == 0 and k <= target)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"mesh.model must be a positive integer or 'auto', got {value!r}") from None


def make_mesh(data: int = -1, model: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ``('data', 'model')`` mesh over all (or the given) devices; ``data=-1`` takes what ``model`` leaves.

    Raises:
      ValueError: sizes that do not multiply to the device count.
    """
    devices = jax.devices() if devices is None else devices
    count = len(devices)
    if model < 1 or count % model:
        raise ValueError(f"mesh.model={model} must be a positive divisor of the device count {count}")
    data = count // model if data == -1 else data
    if data * model != count:
        raise ValueError(f"mesh data={data} × model={model} must equal the device count {count} (or use data=-1)")
    return jax.make_mesh((data, model), ("data", "model"), (jax.sharding.AxisType.Auto,) * 2, devices=devices)


def single_device_mesh() -> Mesh:
    """The default mesh of a source used outside the trainer: this process's first device."""
    return make_mesh(devices=jax.local_devices()[:1])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Sharding of a group's batch ``[n_sites, B, d]``: tokens split over ``'data'``."""
    return NamedSharding(mesh, P(None, "data", None))
