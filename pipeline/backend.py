"""Which Keras backend runs the models (TensorFlow, JAX or PyTorch), decided the way Keras decides,
without importing Keras, so a cache key can name it on the fast cache-hit path.

Keras reads `KERAS_BACKEND`, else `backend` in `$KERAS_HOME/keras.json` (default
`~/.keras/keras.json`), else uses TensorFlow. `select()` (the CLI's `--backend`) sets the
variable before Keras is imported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import UserError
from pipeline.versions import version

BACKENDS = ("tensorflow", "jax", "torch")
DEFAULT = "tensorflow"  # what Keras picks when neither KERAS_BACKEND nor keras.json names one
_LIBRARY = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
_EXTRA = {"tensorflow": "pip install -e .", "jax": 'pip install -e ".[jax]"', "torch": 'pip install -e ".[torch]"'}


def name() -> str:
    """The Keras backend in force (or that Keras will pick when first imported)."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend") and hasattr(keras.backend, "backend"):
        return str(keras.backend.backend())
    env = os.environ.get("KERAS_BACKEND")
    if env:
        return _canonical(env)
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        configured = json.loads((home / "keras.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        configured = None
    return _canonical(configured) if configured else DEFAULT


def _canonical(value: str) -> str:
    v = value.strip().lower()
    return {"pytorch": "torch", "tf": "tensorflow"}.get(v, v)


def select(backend: str | None) -> str:
    """Make `backend` the Keras backend of this process (before Keras loads); returns it."""
    if not backend:
        return name()
    b = _canonical(backend)
    if b not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if "keras" in sys.modules and name() != b:
        raise UserError(f"Keras is already running on {name()} in this process; set KERAS_BACKEND={b} "
                        f"before starting Python instead")
    os.environ["KERAS_BACKEND"] = b
    return b


def check_recorded(config: Mapping[str, Any], what: str) -> None:
    """Refuse to rebuild, on this process's backend, features that `what` (a run, whose config.json is
    `config`: its `backend` and `request.weights`) made on another with random weights: each backend
    initialises them its own way (cosine 0.3 between TensorFlow's and JAX's), so its head would read
    other features without a word. Trained weights give the same features on every backend, so those
    pass; so does a run that recorded no backend (older ones)."""
    recorded, request = config.get("backend"), config.get("request")
    weights = request.get("weights") if isinstance(request, Mapping) else None
    if not recorded or str(weights).lower() != "none":
        return
    current = name()
    if _canonical(str(recorded)) != current:
        raise UserError(f"{what} was made on the {recorded} backend with random weights (--weights none), which "
                        f"{current} initialises differently, so its features would not match; run this with "
                        f"--backend {recorded} (or KERAS_BACKEND={recorded})")


def require() -> str:
    """The backend, checked to be installed; a one-line error with the install command if not."""
    b = name()
    if b not in BACKENDS:
        raise UserError(f"Keras backend {b!r} is not supported here; use one of {', '.join(BACKENDS)} "
                        f"(KERAS_BACKEND or --backend)")
    if importlib.util.find_spec(_LIBRARY[b]) is None:
        others = [o for o in BACKENDS if o != b and importlib.util.find_spec(_LIBRARY[o]) is not None]
        hint = f", or use --backend {others[0]} (installed)" if others else ""
        raise UserError(f"the Keras backend is {b} but {_LIBRARY[b]} is not installed: {_EXTRA[b]}{hint}")
    return b


def library_version(backend: str | None = None) -> str:
    """The installed version of the backend's library (part of the cache key)."""
    return version(_LIBRARY.get(backend or name(), backend or name()))


def keras_module() -> Any:
    """Keras, imported on first use: with TensorFlow it takes seconds, and most commands never need it."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    return keras


def accelerator() -> str | None:
    """'gpu' when the backend sees a GPU, else None (imports the backend's library)."""
    b = name()
    if b == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415 - only the active backend's library, and slow to import
        return "gpu" if tf.config.list_physical_devices("GPU") else None
    if b == "jax":
        import jax  # noqa: PLC0415 - only the active backend's library, and slow to import
        return "gpu" if any(d.platform in ("gpu", "cuda", "rocm") for d in jax.devices()) else None
    if b == "torch":
        import torch  # noqa: PLC0415 - only the active backend's library, and slow to import
        return "gpu" if torch.cuda.is_available() else None
    return None


def mixed_policy() -> str:
    """The Keras dtype policy for `--precision mixed`: bfloat16 where the GPU does it natively
    (compute capability 8+, or any accelerator JAX drives), else float16."""
    b = name()
    if accelerator() == "gpu":
        if b == "torch":
            import torch  # noqa: PLC0415 - only the active backend's library, and slow to import
            return "mixed_bfloat16" if torch.cuda.is_bf16_supported() else "mixed_float16"
        if b == "tensorflow":
            import tensorflow as tf  # noqa: PLC0415 - only the active backend's library, and slow to import
            gpus = tf.config.list_physical_devices("GPU")
            cc = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
            return "mixed_bfloat16" if tuple(cc) >= (8, 0) else "mixed_float16"
        import jax  # noqa: PLC0415 - only the active backend's library, and slow to import
        cc = str(getattr(jax.devices()[0], "compute_capability", "8.0"))
        return "mixed_bfloat16" if float(cc) >= 8.0 else "mixed_float16"
    return "mixed_float16"


class _NoTensorFlow:
    available = False


def set_random_seed(seed: int) -> None:
    """`keras.utils.set_random_seed`, except that on JAX and PyTorch it does not import TensorFlow
    just to seed it (Keras seeds TensorFlow whenever it is installed)."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    if name() == "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    try:
        from keras.src.utils import rng_utils  # noqa: PLC0415 - Keras, slow to import (a private module)
        saved = rng_utils.tf
    except (ImportError, AttributeError):  # another Keras layout: seeding TensorFlow is harmless
        keras.utils.set_random_seed(seed)
        return
    rng_utils.tf = _NoTensorFlow()
    try:
        keras.utils.set_random_seed(seed)
    finally:
        rng_utils.tf = saved
