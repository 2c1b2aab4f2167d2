"""Fine-tuning's input: the shared loader's uint8 batches as a Keras PyDataset (works with
`model.fit` on TensorFlow, JAX and PyTorch), reshuffled every epoch by a permutation seeded with
(seed, epoch), and augmented by `pipeline.data.augment` seeded with (seed, epoch, image): a resumed
run sees exactly the batches, and the views, an uninterrupted one would.

On several devices (JAX data parallel) every batch must split evenly, so batches are padded to a
multiple of the device count with weight-0 copies, and on JAX to the whole batch size (one shape,
one compiled step): every image counts once, the padding not at all, and the real rows weigh
padded/real so a padded batch's mean loss is the unpadded one's (Keras divides by all the rows).
Class weights travel the same way, as per-sample weights.
"""

from __future__ import annotations

import functools
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from pipeline.data.augment import augmented_view
from pipeline.data.loader import default_workers, ordered_map
from pipeline.tracking.metrics import classification_report

PREFETCH = 2  # batches read ahead of the one the model is on, side by side (as Keras' 2 workers did)


def make_batches(source, listing, indices: np.ndarray, size: int, resize: str, batch_size: int,
                 shuffle_seed: int | None = None, first_epoch: int = 0, workers: int | None = None,
                 devices: int = 1, class_weights: np.ndarray | None = None, augment=None, one_hot: int | None = None):
    """A keras PyDataset over the images `indices` (decoded and resized as extraction does).

    Unreadable files are dropped from their batch. Sources without random access (tfds) are
    read once into memory at `size`. With `devices` > 1 or `class_weights` (one per class),
    batches are (x, y, sample weights), padded to a multiple of `devices` with weight-0 rows.
    `augment` (an AugmentConfig; training only) gives each image a random view per epoch.
    `one_hot` (the class count): labels as one-hot rows, for a label-smoothed loss.
    The epoch counts Keras' `on_epoch_end` calls, and Keras makes one before the first epoch too
    (`EpochIterator.reset`), so fit's epoch e reads the order and views of e + 1: a resumed fit
    (`first_epoch`) does the same, so it sees the batches an uninterrupted one would (tested).
    Decoding overlaps training: the next `PREFETCH` batches of the epoch are read ahead, side by side.
    """
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    indices = np.asarray(indices, np.int64)
    labels = np.asarray(listing.labels)
    n_workers = workers or default_workers()
    devices = max(1, int(devices))
    memory: dict[int, np.ndarray] | None = None
    if not getattr(source, "random_access", True):
        memory = {int(i): job() for i, job in zip(np.sort(indices).tolist(),
                                                    source.raw_images(listing, np.sort(indices), size, resize))}

    class _Batches(keras.utils.PyDataset):
        def __init__(self) -> None:
            # one Keras worker: no Keras queue. Keras' queue keeps batches fetched before an epoch
            # ends (Keras-JAX pulls one to build the compiled loss) and serves them in the next
            # epoch; this loader prefetches itself instead, keyed by (epoch, batch), so a batch
            # read ahead is only ever served in the epoch it was read for.
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch = first_epoch
            self.ahead: dict[tuple[int, int], Future] = {}
            self.pool: ThreadPoolExecutor | None = None
            # TensorFlow reads batches on tf.data's thread, which under a MirroredStrategy can run on
            # past the build's throwaway iterator while on_epoch_end sweeps `ahead`
            self.lock = threading.Lock()

        def order(self, epoch: int) -> np.ndarray:
            return epoch_order(indices, shuffle_seed, epoch)

        def __len__(self) -> int:
            return -(-indices.size // batch_size)

        def load(self, ids: Sequence[int], epoch: int) -> tuple[np.ndarray, np.ndarray]:
            if memory is not None:
                jobs = [(i, (lambda i=i: memory[i])) for i in ids]
            else:
                jobs = list(zip(ids, source.raw_images(listing, ids, size, resize)))
            if augment is not None:  # view = epoch + 1 (view 0 is the clean image)
                jobs = [(i, functools.partial(augmented_view, job, augment, int(shuffle_seed or 0), epoch + 1, i))
                        for i, job in jobs]
            kept, images = [], []
            for i, result in ordered_map(jobs, n_workers, len(jobs)):
                if isinstance(result, np.ndarray):
                    kept.append(i)
                    images.append(result)
            if not images:
                return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int32)
            return np.stack(images), labels[np.asarray(kept)].astype(np.int32)

        def batch(self, epoch: int, i: int):
            """Batch `i` of epoch `epoch`: what `__getitem__` serves, whenever it is read."""
            ids = self.order(epoch)[i * batch_size:(i + 1) * batch_size].tolist()
            return finish_batch(*self.load(ids, epoch), devices, class_weights, one_hot)

        def __getitem__(self, i: int):
            with self.lock:
                epoch = self.epoch
                if self.pool is None:
                    self.pool = ThreadPoolExecutor(PREFETCH, thread_name_prefix="finetune-batches")
                for j in range(i + 1, min(i + 1 + PREFETCH, len(self))):
                    if (epoch, j) not in self.ahead:
                        self.ahead[(epoch, j)] = self.pool.submit(self.batch, epoch, j)
                ready = self.ahead.pop((epoch, i), None)
            return ready.result() if ready is not None else self.batch(epoch, i)

        def on_epoch_end(self) -> None:
            with self.lock:
                self.epoch += 1
                for key in [key for key in self.ahead if key[0] < self.epoch]:
                    self.ahead.pop(key).cancel()  # read ahead for an epoch that is over

        def close(self) -> None:
            """Stop reading ahead (a finished or interrupted run must not wait for batches no one reads)."""
            with self.lock:
                for future in self.ahead.values():
                    future.cancel()
                self.ahead.clear()
                if self.pool is not None:
                    self.pool.shutdown(wait=False, cancel_futures=True)
                    self.pool = None

    return _Batches()


def map_batches(data, rows_for_epoch, labels: np.ndarray, batch_size: int, shuffle_seed: int | None = None,
                first_epoch: int = 0, devices: int = 1, class_weights: np.ndarray | None = None,
                one_hot: int | None = None):
    """A keras PyDataset over cached trunk maps (`trunk.py`): `rows_for_epoch(epoch)` gives the
    rows of `data` (an array, or a FeatureFile read per batch) to use in fit's epoch `epoch` (0 first),
    e.g. one view of every training image; shuffled by (seed, epoch) like `make_batches`, so a resumed
    run sees the batches an uninterrupted one would. `labels` is per row of `data`. Keras' call of
    `on_epoch_end` before the first epoch makes the counter fit's epoch + 1, hence the `- 1` (without
    it the first epoch read view 1, and a fit of no more epochs than views never saw the clean images)."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    devices = max(1, int(devices))
    in_memory = isinstance(data, np.ndarray)

    class _Maps(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False, max_queue_size=4)
            self.epoch = first_epoch

        def order(self, epoch: int) -> np.ndarray:  # `epoch`: the counter (fit's epoch + 1)
            return epoch_order(np.asarray(rows_for_epoch(epoch - 1), np.int64), shuffle_seed, epoch)

        def __len__(self) -> int:
            return -(-len(rows_for_epoch(max(self.epoch - 1, first_epoch))) // batch_size)

        def __getitem__(self, i: int):
            rows = self.order(self.epoch)[i * batch_size:(i + 1) * batch_size]
            if in_memory:
                x = data[rows]
            else:  # HDF5 reads want increasing rows
                ordered = np.argsort(rows)
                x = np.empty((rows.size, *data.feature_shape), np.float16)
                x[ordered] = data.load(rows[ordered], dtype="float16")
            return finish_batch(x.astype(np.float32), labels[rows].astype(np.int32), devices, class_weights, one_hot)

        def on_epoch_end(self) -> None:
            self.epoch += 1

    return _Maps()


def epoch_order(rows: np.ndarray, shuffle_seed: int | None, epoch: int) -> np.ndarray:
    """`rows` in epoch `epoch`'s order: shuffled by (seed, epoch), so a resumed run sees the order an
    uninterrupted one would; unshuffled without a seed."""
    if shuffle_seed is None:
        return rows
    return np.random.default_rng([int(shuffle_seed), int(epoch)]).permutation(rows)


def finish_batch(x: np.ndarray, y: np.ndarray, devices: int, class_weights: np.ndarray | None,
                 one_hot: int | None):
    """(x, y) or (x, y, sample weights): padded for `devices`, class-weighted, labels one-hot when asked."""
    w = None
    if devices > 1 or class_weights is not None:
        x, y, w = pad_to_multiple(x, y, devices)
        if class_weights is not None:
            w = (w * np.asarray(class_weights, np.float32)[y]).astype(np.float32)
    if one_hot:
        y = np.eye(int(one_hot), dtype=np.float32)[y]
    return (x, y) if w is None else (x, y, w)


def pad_to_multiple(x: np.ndarray, y: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, sample weights) padded with copies of the first row to a multiple of `multiple`;
    weights are 0 for the padding and (padded rows / real rows) for the real ones, so the weighted
    sum over all rows divided by their number (Keras' mean loss) is the real rows' mean."""
    n = y.size
    extra = (-n) % multiple if n else 0
    w = np.ones(n + extra, np.float32)
    if extra:
        w[:n] = (n + extra) / n
        w[n:] = 0.0
        x = np.concatenate([x, np.repeat(x[:1], extra, axis=0)])
        y = np.concatenate([y, np.repeat(y[:1], extra)])
    return x, y, w


def predict_on_batch(model, x: np.ndarray) -> np.ndarray:
    """The model's outputs for one batch. Under a TensorFlow MirroredStrategy, Keras'
    `predict_on_batch` hands every replica the whole batch and concatenates (2 replicas: twice the
    rows), so there the batch goes through `predict`, which splits it across the replicas."""
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is not None and strategy.num_replicas_in_sync > 1:
        return np.asarray(model.predict(x, batch_size=len(x), verbose=0))
    return np.asarray(model.predict_on_batch(x))


def predict_batches(model, batches) -> tuple[np.ndarray, np.ndarray]:
    """(labels, float64 probabilities) of the model over every batch, in order (padding dropped)."""
    ys, ps = [], []
    for i in range(len(batches)):
        x, y, *w = batches[i]
        if len(y):
            real = np.asarray(w[0]) > 0 if w else np.ones(len(y), bool)
            ys.append(y[real])
            ps.append(np.asarray(predict_on_batch(model, x), np.float64)[real])
    if not ys:
        return np.zeros(0, np.int32), np.zeros((0, 0))
    return np.concatenate(ys), np.concatenate(ps)


def evaluate(model, batches, class_names: Sequence[str]) -> dict[str, Any]:
    """`pipeline.tracking.metrics.classification_report` of the model on labelled batches."""
    return report(*predict_batches(model, batches), class_names)


def report(y: np.ndarray, p: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """`classification_report` of probabilities `p` for labels `y` (none: the empty report)."""
    if y.size == 0:
        return classification_report(y, np.zeros((0, len(class_names))), class_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return classification_report(y, p, class_names)
