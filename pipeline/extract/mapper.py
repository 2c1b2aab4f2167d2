"""One small runner per Keras backend for the batch -> features call.

A runner takes uint8 batches (numpy) and returns float32 features (numpy). `submit` starts a
batch and returns at once where the backend computes asynchronously (JAX, PyTorch on CUDA), so
the caller can hand the next batch over before collecting this one:

- TensorFlow: a tf.function; XLA on a GPU; on the CPU the graph with the frozen weights folded in
  as constants (Grappler then folds batch norms into convolutions: about 1.25x less CPU).
- JAX: `model.stateless_call` under `jax.jit`, batches padded to one shape (one compilation).
- PyTorch: `torch.inference_mode()`, the batch moved to the model's device.

Mixed precision is the Keras dtype policy the model was built under (`backend.mixed_policy`).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pipeline.backend import accelerator, name as backend_name


class Runner:
    """Base: `collect(submit(x))` = features of uint8 batch `x` as float32 numpy."""

    eager = False  # TensorFlow's small-job runner: not kept for the next job

    def __init__(self, pad_to: int | None = None) -> None:
        self.pad_to = pad_to

    def _pad(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        n = len(x)
        if self.pad_to and n < self.pad_to:
            x = np.concatenate([x, np.zeros((self.pad_to - n, *x.shape[1:]), x.dtype)])
        return x, n

    def submit(self, x: np.ndarray) -> Any:
        xp, n = self._pad(x)
        return self._start(xp), n

    def collect(self, handle: Any) -> np.ndarray:
        out, n = handle
        return self._finish(out)[:n]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.collect(self.submit(x))

    def _start(self, x: np.ndarray) -> Any:
        raise NotImplementedError

    def _finish(self, out: Any) -> np.ndarray:
        raise NotImplementedError


class TensorFlowRunner(Runner):
    def __init__(self, model, size: int, jit: bool, eager: bool = False) -> None:
        super().__init__(pad_to=None)
        self.eager = eager
        self.fn = (lambda x: model(x, training=False)) if eager else tf_inference_fn(model, size, jit)

    def _start(self, x: np.ndarray) -> Any:
        return self.fn(x)

    def _finish(self, out: Any) -> np.ndarray:
        return np.asarray(out, np.float32)


def tf_inference_fn(model, size: int, jit: bool) -> Callable:
    """The TensorFlow batch -> features function: XLA-compiled where `jit`, else on the CPU the
    graph with frozen weights as constants; falls back to the plain tf.function where freezing
    fails (a private API; graphs over protobuf's 2 GB limit)."""
    import tensorflow as tf  # noqa: PLC0415 - only on the TensorFlow backend, which takes seconds to import

    dtype = model.inputs[0].dtype
    fn = tf.function(lambda x: model(x, training=False), jit_compile=jit, reduce_retracing=True)
    if jit:
        return fn
    spec = tf.TensorSpec([None, size, size, 3], dtype)
    try:
        from tensorflow.python.framework.convert_to_constants import (  # noqa: PLC0415 - TensorFlow's, as above
            convert_variables_to_constants_v2,
        )
        frozen = convert_variables_to_constants_v2(fn.get_concrete_function(spec))
    except Exception:  # noqa: BLE001 - a private API, or too large a graph: the tf.function is just as correct
        return fn
    return lambda x: frozen(tf.convert_to_tensor(x, dtype))[0]


class JaxRunner(Runner):
    def __init__(self, model, batch_size: int) -> None:
        super().__init__(pad_to=batch_size)
        import jax  # noqa: PLC0415 - only on the JAX backend
        import jax.numpy as jnp  # noqa: PLC0415 - only on the JAX backend

        self.trainable = [v.value for v in model.trainable_variables]
        self.non_trainable = [v.value for v in model.non_trainable_variables]

        def call(trainable, non_trainable, x):
            y, _ = model.stateless_call(trainable, non_trainable, x, training=False)
            return y.astype(jnp.float32)

        self.fn = jax.jit(call)

    def _start(self, x: np.ndarray) -> Any:
        return self.fn(self.trainable, self.non_trainable, x)  # dispatched asynchronously

    def _finish(self, out: Any) -> np.ndarray:
        return np.asarray(out)


class TorchRunner(Runner):
    def __init__(self, model) -> None:
        super().__init__(pad_to=None)
        import torch  # noqa: PLC0415 - only on the PyTorch backend

        self.torch = torch
        self.model = model
        weights = model.weights
        self.device = weights[0].value.device if weights else torch.device("cpu")

    def _start(self, x: np.ndarray) -> Any:
        torch = self.torch
        with torch.inference_mode():
            t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
            t = t.to(self.device, non_blocking=True)  # a no-op for a tensor already there (bench/extract.py)
            return self.model(t, training=False).float()  # queued on CUDA; synchronous on the CPU

    def _finish(self, out: Any) -> np.ndarray:
        return out.detach().cpu().numpy()


SMALL_JOB = 128  # images: below this, TensorFlow on the CPU runs eagerly (freezing costs ~2 s up front)


def make_runner(model, size: int, batch_size: int, jit: bool | None = None, n_images: int | None = None) -> Runner:
    """The runner for the Keras backend in force. `jit`: TensorFlow XLA (None: on a GPU only).
    `n_images`, when known: a small job (an incremental extraction's few new images) on the
    TensorFlow CPU path skips graph freezing and runs eagerly."""
    backend = backend_name()
    if backend == "jax":
        return JaxRunner(model, batch_size)
    if backend == "torch":
        return TorchRunner(model)
    gpu = accelerator() == "gpu"
    jit = gpu if jit is None else bool(jit)
    return TensorFlowRunner(model, size, jit, eager=not jit and n_images is not None and n_images < SMALL_JOB)


# The last model and runner built in this process, so that the next extraction with the same
# backbone (a notebook's second folder, an incremental run's few new images) skips building the
# model (~1 s) and freezing its graph (~2 s). One of each: a VGG16 held is ~0.5 GB.
_LAST: dict[str, tuple] = {}


def cached_runner(model_key: tuple, build: Callable[[], Any], size: int, batch_size: int,
                  jit: bool | None = None, n_images: int | None = None) -> tuple[Runner, tuple[int, ...]]:
    """(runner, feature shape) for the model `build()` makes, reusing this process's last one when
    `model_key` (everything that decides the graph and its weights) and the runner's settings match."""
    small = n_images is not None and n_images < SMALL_JOB  # eager or frozen decides the kernels: part of the key
    rkey = (backend_name(), model_key, size, batch_size, jit, small)
    hit = _LAST.get("runner")
    if hit is not None and hit[0] == rkey:
        return hit[1], hit[2]
    hit = _LAST.get("model")
    if hit is not None and hit[0] == rkey[:2]:
        model = hit[1]
    else:
        _LAST.clear()  # one model at a time: not the new one beside the old one's runner
        model = build()
    shape = tuple(int(d) for d in model.output.shape[1:])
    _LAST["model"] = (rkey[:2], model)
    runner = make_runner(model, size, batch_size, jit, n_images)
    if not runner.eager:
        _LAST["runner"] = (rkey, runner, shape)
    return runner, shape


def release_models() -> None:
    """Drop the model and runner this process keeps for its next extraction (frees their memory)."""
    _LAST.clear()
