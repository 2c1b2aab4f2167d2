"""Read, decode and resize one image file to a uint8 RGB square, in numpy, without TensorFlow.

The rule (recorded in the cache key by `identity()`):
- the header (format, size) of a plain JPEG or PNG is read by `quick_size`, of anything else by
  Pillow, which also refuses what is not an image; either bounds memory before any pixel is decoded;
- pixels are decoded by OpenCV, which applies the EXIF orientation (a phone photo stored
  sideways comes out upright) and handles JPEG (CMYK too), PNG (8/16-bit, palette, RGBA),
  WebP, TIFF, BMP and GIF (first frame); Pillow is the fallback for what OpenCV rejects;
- a JPEG whose shorter side is at least 2x, 4x or 8x the target is decoded at 1/2, 1/4 or 1/8
  scale in the DCT (libjpeg's reduced decode: less work, and a proper low-pass);
- then an antialiased resize: area averaging where the image shrinks, bilinear where it grows.

Every failure raises `DecodeError` with a short reason a user can act on; callers skip the file.
"""

from __future__ import annotations

import io
import math
import os
import threading
import warnings
from typing import Any

import numpy as np

from pipeline.versions import version

RESIZE_METHODS = ("stretch", "crop")
# One list of what every command reads: extension -> the format Pillow names in the header.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FORMATS = ("JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "TIFF")
MAX_PIXELS = 100_000_000  # width x height of a decoded image (after any reduced-scale decode)
HEADER_LIMIT = 1 << 30  # width x height in a header beyond which OpenCV refuses even a reduced decode
UNKNOWN_READ_LIMIT = 64 << 20  # bytes: a larger file whose first bytes claim no image format is not read
MISSING, DENIED = "missing file", "permission denied"  # skip reasons `may_read_later` knows
RULE_VERSION = 1  # bump when the decode/resize rule below changes what pixels come out


class DecodeError(Exception):
    """An image that cannot be used; the message is the reason stored in `skipped_reasons`."""


_IMPORT_LOCK = threading.Lock()
_LIBS: dict[str, Any] = {}


def load_libraries() -> None:
    """Import OpenCV and Pillow now, in the calling thread: the loader calls it before it starts its
    threads. Python 3.11's concurrent first import of a package (decode threads, or the main thread
    importing Keras, which imports Pillow) can hand a thread a half-made module: "cannot import name
    'ImageMode' from 'PIL'" once failed a whole extraction. Lazy, so a cache hit imports neither."""
    _libs()


def _libs() -> dict[str, Any]:
    """OpenCV and Pillow, imported once under a lock (see `load_libraries`)."""
    if not _LIBS:
        with _IMPORT_LOCK:
            if not _LIBS:
                import cv2  # noqa: PLC0415 - lazy, so a cache hit imports neither (see load_libraries)
                from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: PLC0415 - as OpenCV above

                cv2.setNumThreads(1)  # parallelism comes from the loader's threads, one image each
                # OpenCV's own warnings ("[ WARN:0] ... OpenCV TIFF: ... 32-bit samples") name no file, and
                # such an image is read by Pillow instead, or skipped with its reason
                cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
                # Pillow warns (with a source line, around the tool's summary) from 89M pixels; this
                # module bounds decoding itself (MAX_PIXELS after a reduced decode), and Pillow's
                # DecompressionBombError (from 179M) still becomes a DecodeError
                warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
                # Pillow's own UserWarnings on a damaged file ("Corrupt EXIF data") name no file and
                # print a source line; the image is decoded or skipped with its reason either way
                warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")
                _LIBS.update(cv2=cv2, Image=Image, ImageOps=ImageOps, UnidentifiedImageError=UnidentifiedImageError)
    return _LIBS


def _cv2():
    return _libs()["cv2"]


def identity() -> dict[str, Any]:
    """What of the decoder goes into the cache key: libraries, versions and the rule (read from
    package metadata, so the cache-hit path imports neither OpenCV nor Pillow)."""
    return {"library": f"opencv-{version(*_OPENCV_DISTS)}", "header": f"pillow-{version('pillow')}",
            "rule": RULE_VERSION, "reduced_scale": "jpeg 1/2,1/4,1/8 while shorter side >= size",
            "exif": "orientation applied", "resize": "area down, bilinear up"}


_OPENCV_DISTS = ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
                 "opencv-contrib-python")


_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"))  # + BigTIFF


_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1")


def claimed_format(data: bytes) -> str | None:
    """The format a file's first bytes claim, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for sig, fmt in _MAGIC if data.startswith(sig)), None)


_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_STANDALONE = frozenset((0x01, *range(0xD0, 0xD8)))


_PROGRESSIVE = frozenset((0xC2, 0xC6, 0xCA, 0xCE))  # frames whose whole coefficients are held while decoding


def quick_size(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) of a plain JPEG (its SOF segment; format "JPEG-progressive" for a
    progressive frame) or PNG (its IHDR chunk), read in a few microseconds; None for anything else or
    anything unusual, which Pillow then reads. Pillow's header parse holds the GIL ~80 us an image: with 16 decode threads it capped the loader at ~2,500
    img/s on an H200 machine, and ~4,500 without it (bench/gpu/diagnose.sh)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return ("PNG", w, h) if w and h else None
    if data[:3] != b"\xff\xd8\xff":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF:
            if length < 8 or i + 9 > n:
                return None
            h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            # "JPEG" for what libjpeg decodes reduced in bounded memory; progressive frames are not
            return ("JPEG" if marker not in _PROGRESSIVE else "JPEG-progressive", w, h) if w and h else None
        if marker in (0xD9, 0xDA) or length < 2:  # end of image, or scan data before any frame header
            return None
        i += 2 + length
    return None


def read_header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the file's header, or DecodeError with the reason."""
    libs = _libs()
    Image, UnidentifiedImageError = libs["Image"], libs["UnidentifiedImageError"]

    if not data:
        raise DecodeError("empty file")
    quick = quick_size(data)
    if quick is not None:
        fmt, w, h = quick
        # a baseline JPEG decodes reduced in little memory, up to what OpenCV accepts at all; a
        # progressive one holds every coefficient (~3 bytes a pixel) whatever the scale: Pillow's bound
        limit = HEADER_LIMIT if fmt == "JPEG" else 2 * Image.MAX_IMAGE_PIXELS
        if w * h > limit:
            raise DecodeError(f"too large to decode safely ({w}x{h}, over {limit:,} pixels)")
        return ("JPEG" if fmt == "JPEG-progressive" else fmt), w, h  # decode() bounds the rest: MAX_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = str(im.format or "?"), im.size
    except Image.DecompressionBombError:  # formats without a reduced decode: Pillow's own bound
        raise DecodeError(f"too large to decode safely (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:  # iPhone photos; Pillow has no HEIF reader
            raise DecodeError("unsupported format HEIF (convert it to JPEG first, e.g. with heif-convert)") from None
        magic = claimed_format(data)
        raise DecodeError(f"corrupt {magic} (unreadable header)" if magic else "not an image (unrecognised format)"
                          ) from None
    except Exception as exc:  # noqa: BLE001 - a recognised header that is broken
        raise DecodeError(f"corrupt header ({type(exc).__name__})") from None
    if fmt not in FORMATS:
        raise DecodeError(f"unsupported format {fmt} (supported: JPEG, PNG, BMP, GIF, WebP, TIFF)")
    return fmt, w, h


def reduction(fmt: str, width: int, height: int, size: int) -> int:
    """The JPEG reduced-decode factor: the largest of 8, 4, 2 keeping the shorter side >= size."""
    if fmt not in ("JPEG", "MPO"):
        return 1
    short = min(width, height)
    for k in (8, 4, 2):
        if short >= k * size:
            return k
    return 1


def decode(data: bytes, size: int | None = None) -> np.ndarray:
    """Decode image bytes to uint8 RGB (H, W, 3), upright; reduced-scale when `size` allows it."""
    cv2 = _cv2()
    fmt, w, h = read_header(data)
    k = reduction(fmt, w, h, size) if size else 1
    if math.ceil(w / k) * math.ceil(h / k) > MAX_PIXELS:
        raise DecodeError(f"too large: {w}x{h} pixels (limit {MAX_PIXELS:,}); downscale it first")
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[k]
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if img is not None and img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)  # the same pixels as img[..., ::-1], ~10x cheaper
    return _decode_pillow(data, fmt)


def _decode_pillow(data: bytes, fmt: str) -> np.ndarray:
    """Fallback for what OpenCV rejects (some GIFs, odd TIFFs); refuses truncated files."""
    Image, ImageOps = _libs()["Image"], _libs()["ImageOps"]

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # one channel of 16/32-bit ints or floats
                arr = np.nan_to_num(np.asarray(im, np.float64))
                peak = arr.max(initial=0)
                # the range the values were stored in: 0..1 floats, 8 or 16 bits, or else their own maximum
                top = 1.0 if im.mode == "F" and peak <= 1 else 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
                gray = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=-1)
            return np.asarray(im.convert("RGB"), np.uint8)
    except Exception as exc:  # noqa: BLE001 - Pillow's errors on a damaged file are many
        raise DecodeError(f"corrupt or truncated {fmt} ({str(exc).splitlines()[0][:80] or type(exc).__name__})") from None


def read_file(path: str) -> bytes:
    """The file's bytes, or DecodeError naming why it cannot be read. A large file whose first bytes
    claim no image format (a phone's video in a class folder) is refused unread, not loaded whole."""
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size > UNKNOWN_READ_LIMIT:
                if claimed_format(fh.read(16)) is None:
                    raise DecodeError("not an image (unrecognised format)")
                fh.seek(0)
            return fh.read()
    except FileNotFoundError:
        raise DecodeError(MISSING) from None
    except IsADirectoryError:
        raise DecodeError("a folder, not a file") from None
    except PermissionError:
        raise DecodeError(DENIED) from None
    except OSError as exc:
        raise DecodeError(f"unreadable ({exc.strerror or type(exc).__name__})") from None


def may_read_later(reason: str) -> bool:
    """Whether a skip reason of `read_file` can change without the file changing (a permission granted,
    a file put back, a disk remounted): the cache's key (size and mtime) does not see that."""
    return reason in (MISSING, DENIED) or reason.startswith("unreadable (")


def resize(img: np.ndarray, size: int, method: str = "stretch") -> np.ndarray:
    """Resize uint8 RGB to size x size: 'stretch' ignores aspect ratio, 'crop' scales the shorter
    side to `size` then takes the centre square. Antialiased when shrinking."""
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method must be one of {RESIZE_METHODS}")
    h, w = img.shape[:2]
    if method == "crop" and size * size * max(h, w) > MAX_PIXELS * min(h, w):
        # a long strip (1 x 1,000,000 pixels): scaling its short side up first would build a strip of
        # over MAX_PIXELS (96 x 96,000,000: 27 GB); crop its centre square first, then scale that
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return _resize_to(np.ascontiguousarray(img[top:top + s, left:left + s]), size, size)
    if method == "crop":
        scale = size / min(h, w)
        th, tw = max(size, math.ceil(h * scale - 1e-9)), max(size, math.ceil(w * scale - 1e-9))
        out = _resize_to(img, th, tw)
        top, left = (th - size) // 2, (tw - size) // 2
        return np.ascontiguousarray(out[top:top + size, left:left + size])
    return _resize_to(img, size, size)


def _resize_to(img: np.ndarray, th: int, tw: int) -> np.ndarray:
    cv2 = _cv2()
    h, w = img.shape[:2]
    if (h, w) == (th, tw):
        return img
    if th <= h and tw <= w:
        return cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
    if th >= h and tw >= w:
        return cv2.resize(img, (tw, th), interpolation=cv2.INTER_LINEAR)
    # one side shrinks, the other grows: average the shrinking side first, then interpolate
    mid = cv2.resize(img, (min(w, tw), min(h, th)), interpolation=cv2.INTER_AREA)
    return cv2.resize(mid, (tw, th), interpolation=cv2.INTER_LINEAR)


def load_file(path: str, size: int, method: str = "stretch") -> np.ndarray:
    """read -> decode (reduced scale where possible) -> resize: uint8 (size, size, 3)."""
    img = decode(read_file(path), size)
    try:
        return resize(img, size, method)
    except _cv2().error as exc:  # one image OpenCV cannot resize is skipped with why, not the whole run
        raise DecodeError(f"cannot be resized ({str(exc).strip().splitlines()[-1][:80]})") from None


def to_rgb(img: np.ndarray) -> np.ndarray:
    """An in-memory image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), any integer/float 0..255
    range, as uint8 RGB."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.clip(np.round(a.astype(np.float32)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)
