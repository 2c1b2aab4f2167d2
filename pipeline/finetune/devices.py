"""Where fine-tuning runs: TensorFlow's MirroredStrategy or JAX's DataParallel over several devices,
and the multiple every batch is padded to so each step splits evenly (and, on JAX, keeps one shape)."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Sequence

from pipeline import backend


def tf_strategy():
    """TensorFlow's strategy: a MirroredStrategy over the GPUs when there are several, or over the
    CPU's logical devices where the user split it in two or more (as tests do); else the default."""
    import tensorflow as tf  # noqa: PLC0415 - only on the TensorFlow backend

    mirrored = _tf_mirrored()
    return mirrored if mirrored is not None else tf.distribute.get_strategy()


@functools.lru_cache(maxsize=1)
def _tf_mirrored():
    """The MirroredStrategy `tf_strategy` uses (None: one device), made once per process: the devices
    cannot change once TensorFlow has started."""
    import tensorflow as tf  # noqa: PLC0415 - only on the TensorFlow backend

    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    cpus = tf.config.list_logical_devices("CPU")
    if not tf.config.list_physical_devices("GPU") and len(cpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in cpus])
    return None


def batch_multiple(batch_size: int, replicas: int) -> int:
    """What every training and evaluation batch is padded to a multiple of (weight-0 rows): the
    replicas a data-parallel step splits it over, and on JAX the whole batch size, as JAX compiles a
    step per batch shape: on an H200 a short last batch's compile (16 s for Lite0) fell inside the
    first epoch and fine-tuned at 40 img/s against 705 with one shape (bench/gpu/diagnose.sh)."""
    if backend.name() == "jax":
        return -(-int(batch_size) // replicas) * replicas
    return int(replicas)


def tf_replicas() -> int:
    """Replicas of TensorFlow's strategy (1 on other backends): a MirroredStrategy splits each batch
    across them, so batches are padded to a multiple, as for JAX's devices."""
    return tf_strategy().num_replicas_in_sync if backend.name() == "tensorflow" else 1


def data_parallel_devices() -> list:
    """The devices JAX data parallelism spreads batches over (empty or one: no distribution)."""
    if backend.name() != "jax":
        return []
    import jax  # noqa: PLC0415 - only on the JAX backend

    devices = jax.devices()
    return list(devices) if len(devices) > 1 else []


@contextlib.contextmanager
def distribution(devices: Sequence[Any]):
    """Within the block, Keras' DataParallel distribution over `devices` (when several): variables
    are replicated and each batch is split across them. The previous distribution comes back after."""
    if len(devices) < 2:
        yield
        return
    keras = backend.keras_module()
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=list(devices)))
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)

