"""pipeline.data: numpy decoding (formats, EXIF, reduced scale, bad files), resizing, seeded
augmentation and the ordered parallel loader. No Keras, no TensorFlow."""

from __future__ import annotations

import functools
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.data import decode as dec
from pipeline.data.augment import AugmentConfig, augment
from pipeline.data.loader import batches

from conftest import _img, damage_scan


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(h: int = 60, w: int = 90) -> np.ndarray:
    """A smooth picture with distinct quadrants (so rotations and flips are visible)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], axis=-1)
    img[: h // 2, : w // 2] = (230, 40, 40)
    return img.astype(np.uint8)


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"),
                                      ("PNG", "P"), ("BMP", "RGB"), ("GIF", "P"), ("WEBP", "RGB"),
                                      ("TIFF", "RGB"), ("JPEG", "CMYK")])
def test_every_format_decodes_to_upright_rgb(fmt, mode):
    buf = io.BytesIO()
    Image.fromarray(_photo()).convert(mode).save(buf, fmt)
    data = buf.getvalue()
    out = dec.decode(data)
    assert out.dtype == np.uint8 and out.shape == (60, 90, 3)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
    assert np.abs(out.astype(np.int16) - ref).mean() < 4  # same picture as Pillow sees it


def test_sixteen_bit_png_is_scaled_not_clipped():
    gray16 = (np.arange(60 * 90).reshape(60, 90) * 12).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray16).save(buf, "PNG")
    out = dec.decode(buf.getvalue())
    np.testing.assert_allclose(out[..., 0].astype(float), gray16 / 257.0, atol=1.01)


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_gives_the_picture_physically_rotated(orientation):
    """An image saved with an orientation tag decodes like the same picture turned and saved
    without the tag (PNG, so no JPEG re-encoding blurs the comparison)."""
    from PIL import ImageOps

    arr = _photo()
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = _encode(arr, "PNG", exif=exif.tobytes())
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(tagged))).convert("RGB"))
    plain = _encode(upright, "PNG")
    np.testing.assert_array_equal(dec.decode(tagged), dec.decode(plain))
    np.testing.assert_array_equal(dec.resize(dec.decode(tagged), 32), dec.resize(dec.decode(plain), 32))


def test_reduced_scale_decode_for_large_jpegs():
    assert dec.reduction("JPEG", 2000, 1500, 224) == 4
    assert dec.reduction("JPEG", 500, 375, 224) == 1
    assert dec.reduction("PNG", 4000, 4000, 224) == 1
    big = np.repeat(np.repeat(_photo(), 10, axis=0), 10, axis=1)  # 600 x 900
    data = _encode(big, "JPEG", quality=95)
    assert dec.decode(data, size=100).shape == (150, 225, 3)  # 1/4: shorter side 150 >= 100
    full = dec.resize(dec.decode(data), 100)
    reduced = dec.resize(dec.decode(data, size=100), 100)
    assert np.abs(full.astype(int) - reduced.astype(int)).mean() < 3


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"hello, I am a text file", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + bytes(range(200)), "corrupt"),
])
def test_bad_bytes_give_a_reason(content, reason):
    with pytest.raises(dec.DecodeError, match=reason):
        dec.decode(content)


def test_truncated_jpeg_and_png_are_refused():
    for fmt in ("JPEG", "PNG"):
        data = _encode(_img(np.random.default_rng(0), 1, 64), fmt)
        with pytest.raises(dec.DecodeError):
            dec.decode(data[: len(data) // 2])


def test_missing_file_and_unsupported_format(tmp_path):
    with pytest.raises(dec.DecodeError, match="missing file"):
        dec.read_file(str(tmp_path / "nope.jpg"))
    buf = io.BytesIO()
    Image.fromarray(_photo()).save(buf, "ICO")
    with pytest.raises(dec.DecodeError, match="unsupported format ICO"):
        dec.decode(buf.getvalue())


def test_huge_images_are_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(dec, "MAX_PIXELS", 1000)
    data = _encode(_photo(), "PNG")  # 5400 pixels
    with pytest.raises(dec.DecodeError, match="too large"):
        dec.decode(data)
    jpeg = _encode(np.zeros((200, 200, 3), np.uint8), "JPEG")
    assert dec.decode(jpeg, size=25).shape == (25, 25, 3)  # 1/8 decode: 625 pixels fit the limit


def _with_sof_size(jpeg: bytes, w: int, h: int) -> bytes:
    """The JPEG with its frame header (SOF) claiming w x h."""
    i = 2
    while jpeg[i + 1] not in (0xC0, 0xC2):
        i += 2 + int.from_bytes(jpeg[i + 2:i + 4], "big")
    return jpeg[:i + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + jpeg[i + 9:]


def test_the_quick_header_reader_agrees_with_pillow_and_leaves_the_unusual_to_it():
    """JPEG (baseline, progressive, with EXIF and ICC segments before the frame) and PNG sizes are read
    without Pillow, equal to Pillow's; anything else or anything odd returns None (Pillow reads it)."""
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = [_encode(_photo(37, 91), "JPEG"), _encode(_photo(120, 33), "JPEG", progressive=True),
             _encode(_photo(64, 48), "JPEG", exif=exif.tobytes(), icc_profile=bytes(3000)),
             _encode(_photo(50, 70), "PNG"), _encode(_img(rng, 1, 40)[:, :30], "PNG", optimize=True)]
    for data in cases:
        with Image.open(io.BytesIO(data)) as im:
            assert dec.quick_size(data)[1:] == im.size
        assert dec.read_header(data)[1:] == dec.quick_size(data)[1:]
    jpeg = cases[0]
    sos = jpeg.index(b"\xff\xda")
    assert dec.quick_size(jpeg[:20]) is None                    # cut inside the header
    assert dec.quick_size(jpeg[:2] + jpeg[sos:]) is None         # scan data before any frame header
    assert dec.quick_size(_encode(_photo(), "BMP")) is None and dec.quick_size(b"") is None
    with pytest.raises(dec.DecodeError, match="corrupt"):        # so Pillow still names what is wrong
        dec.decode(jpeg[:20])
    with pytest.raises(dec.DecodeError, match="too large to decode safely"):  # OpenCV refuses even 1/8 of it
        dec.read_header(_with_sof_size(jpeg, 40_000, 30_000))
    # 400 MP: over Pillow's bomb bound, but a 1/8 decode is 6 MP, under the documented 100 MP after reduction
    assert dec.read_header(_with_sof_size(jpeg, 20_000, 20_000)) == ("JPEG", 20_000, 20_000)
    assert dec.read_header(_with_sof_size(jpeg, 9_000, 7_000)) == ("JPEG", 9_000, 7_000)
    # a progressive JPEG holds every coefficient while decoding, reduced or not (400 MP: 1.2 GB)
    progressive = cases[1]
    assert dec.quick_size(progressive)[0] == "JPEG-progressive" and dec.read_header(progressive)[0] == "JPEG"
    with pytest.raises(dec.DecodeError, match="too large to decode safely"):
        dec.read_header(_with_sof_size(progressive, 20_000, 20_000))
    assert dec.claimed_format(b"II+\x00\x08\x00\x00\x00") == "TIFF"  # BigTIFF


def test_odd_files_get_their_reason_or_the_right_pixels(tmp_path):
    """HEIF is named; 32-bit and float one-channel TIFFs keep their range (0..1 floats were black,
    int32 over 65535 wrapped round); a large file that claims no image format is refused unread."""
    with pytest.raises(dec.DecodeError, match="unsupported format HEIF"):
        dec.decode(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    ramp = np.tile(np.arange(64, dtype=np.float64), (8, 1)) / 63  # 0..1, left to right
    for arr in (ramp.astype(np.float32), (ramp * 255_000).astype(np.int32)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "TIFF")
        out = dec.decode(buf.getvalue())
        assert out.shape == (8, 64, 3) and out[0, 0, 0] == 0 and out[0, -1, 0] == 255
        assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)  # no wrap-around
    video = tmp_path / "IMG_0001.MOV"
    with open(video, "wb") as fh:
        fh.write(b"\x00\x00\x00\x20ftypqt  ")
        fh.truncate(dec.UNKNOWN_READ_LIMIT + 1)  # sparse: nothing is written
    with pytest.raises(dec.DecodeError, match="not an image"):
        dec.read_file(str(video))
    png = tmp_path / "big.png"  # a large file that is an image is read as before
    png.write_bytes(_encode(_photo(), "PNG"))
    assert dec.read_file(str(png)) == png.read_bytes()


def test_pillow_warnings_on_damaged_files_are_not_printed():
    """Pillow's "Corrupt EXIF data" UserWarning (a truncated TIFF) names no file and printed a source line."""
    code = ("import warnings; from pipeline.data import decode; decode.load_libraries(); "
            "warnings.warn_explicit('Corrupt EXIF data.', UserWarning, 'TiffImagePlugin.py', 982, "
            "module='PIL.TiffImagePlugin'); warnings.warn_explicit('kept', UserWarning, 'x.py', 1, module='x')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "EXIF" not in err and "kept" in err


def test_resize_stretch_and_crop():
    img = _photo(60, 90)
    assert dec.resize(img, 32).shape == (32, 32, 3)
    crop = dec.resize(img, 30, "crop")  # 60x90 -> 30x45 -> centre 30x30
    np.testing.assert_array_equal(crop, dec._resize_to(img, 30, 45)[:, 7:37])
    tiny = np.zeros((8, 8, 3), np.uint8)
    assert dec.resize(tiny, 64).shape == (64, 64, 3)  # upscaling too
    wide = np.zeros((10, 400, 3), np.uint8)
    assert dec.resize(wide, 32).shape == (32, 32, 3)  # one side grows, the other shrinks
    # a 1 x 1,000,000 strip cropped: its centre square, never the 96 x 96,000,000 scaled strip (27 GB)
    strip = np.zeros((1, 1_000_000, 3), np.uint8)
    strip[0, 499_999] = 255
    assert dec.resize(strip, 96, "crop").max() == 255
    long = _photo(20, 400)  # an ordinary long image keeps the scale-then-crop pixels every cache holds
    np.testing.assert_array_equal(dec.resize(long, 96, "crop"), dec._resize_to(long, 96, 1920)[:, 912:1008])


def test_augment_is_deterministic_and_varies_with_view_and_image():
    img = dec.resize(_photo(), 48)
    cfg = AugmentConfig()
    a = augment(img, cfg, seed=3, view=1, index=7)
    np.testing.assert_array_equal(a, augment(img, cfg, seed=3, view=1, index=7))
    assert not np.array_equal(a, augment(img, cfg, seed=3, view=2, index=7))
    assert not np.array_equal(a, augment(img, cfg, seed=3, view=1, index=8))
    assert a.dtype == np.uint8 and a.shape == img.shape
    off = AugmentConfig(flip=False, rotation=0, zoom=0, brightness=0, contrast=0)
    np.testing.assert_array_equal(augment(img, off, 0, 1, 0), img)


@pytest.mark.parametrize("spec, message", [("rotation=15", "rotation must be between 0 and 0.5"),
                                           ("zoom=1", "zoom must be between 0 and 0.9"),
                                           ("brightness=-0.1", "brightness must be between 0 and 1"),
                                           ("contrast=nan", "contrast must be between"),
                                           ("flip=0", "flip takes no strength")])
def test_out_of_range_augmentation_is_a_user_error(spec, message):
    from pipeline.cli.options import parse_augment
    from pipeline.errors import UserError

    with pytest.raises(UserError, match=message):
        parse_augment("flip," + spec if not spec.startswith("flip") else spec)
    assert parse_augment("flip,rotation=0.5,zoom=0.9").rotation == 0.5  # the limits themselves are fine


def test_loader_keeps_order_and_reports_skips():
    def job(i):
        if i % 4 == 3:
            raise dec.DecodeError(f"bad {i}")
        return np.full((4, 4, 3), i, np.uint8)

    out = list(batches(((i, functools.partial(job, i)) for i in range(10)), 3, (4, 4, 3), workers=3))
    tags = np.concatenate([b.tags for b in out])
    np.testing.assert_array_equal(tags, [0, 1, 2, 4, 5, 6, 8, 9])
    assert [s for b in out for s in b.skipped] == [(3, "bad 3"), (7, "bad 7")]
    for b in out:
        assert all(int(img[0, 0, 0]) == t for t, img in zip(b.tags, b.images))


def test_loader_raises_real_errors():
    def boom():
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        list(batches([(0, boom)], 2, (4, 4, 3), workers=1))


def test_first_decodes_on_many_threads_at_once_all_succeed(tmp_path):
    """Decode threads that start cold all succeed: the decoder libraries are imported once, under a
    lock, and the loader imports them before it starts threads (a concurrent first import of Pillow
    once failed a CI extraction with "cannot import name 'ImageMode' from 'PIL'"). A fresh
    interpreter each time, so the first import is really first; the race is rare, so this guards the
    mechanism rather than reproducing the failure."""
    import subprocess
    import sys
    from pathlib import Path

    jpg, gif = tmp_path / "a.jpg", tmp_path / "b.gif"
    jpg.write_bytes(_encode(_photo(), "JPEG"))
    gif.write_bytes(_encode(_photo(), "GIF"))  # the Pillow fallback path
    code = ("import sys; from concurrent.futures import ThreadPoolExecutor; from pipeline.data import decode as d;"
            "paths = sys.argv[1:] * 16;"
            "out = list(ThreadPoolExecutor(32).map(lambda p: d.decode(d.read_file(p), 32).shape, paths));"
            "print(len(out), 'PIL' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", code, str(jpg), str(gif)], capture_output=True, text=True,
                              cwd=root, timeout=120)
        assert proc.returncode == 0 and proc.stdout.split() == ["32", "True"], proc.stderr[-2000:]


def test_a_very_large_header_gives_no_pillow_warning_on_stderr(tmp_path):
    """Pillow's DecompressionBombWarning (from 89M pixels) printed itself with a source line around the
    summary; the module's own limit decides. In a fresh process, as the CLI runs (pytest resets warning
    filters around each test, so the filter the module installs once is checked where it lives)."""
    import struct
    import subprocess
    import sys
    import zlib

    from conftest import ROOT

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = tmp_path / "huge.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 9_500, 8, 2, 0, 0, 0))
                    + chunk(b"IEND", b""))
    code = ("import sys; from pipeline.data import decode as dec; dec.load_libraries(); "
            "print(dec.read_header(open(sys.argv[1], 'rb').read()))")
    proc = subprocess.run([sys.executable, "-c", code, str(png)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0 and "('PNG', 10000, 9500)" in proc.stdout, proc.stderr
    assert "DecompressionBombWarning" not in proc.stderr, proc.stderr


def test_damaged_scan_warnings_from_libjpeg_are_counted_into_one_line(capfd):
    """A JPEG with junk inside its scan data decodes (libjpeg repairs it) and prints its own warning
    straight to fd 2; a command's NativeChatter counts it into one note and passes other C lines on."""
    import os

    from pipeline.quiet_fd import NativeChatter

    good = _encode(_photo(), "JPEG")
    damaged = damage_scan(good)
    capfd.readouterr()
    with NativeChatter() as chatter:
        img = dec.decode(damaged)
        os.write(2, b"a line from some other C library\n")
    assert img.shape == (60, 90, 3)
    assert chatter.counts == {"libjpeg": 1} and chatter.first["libjpeg"].startswith("Corrupt JPEG data")
    err = capfd.readouterr().err
    assert "a line from some other C library" in err and "note: the image decoders warned 1 time(s)" in err
    assert not [line for line in err.splitlines() if line.startswith("Corrupt JPEG data")]
    with NativeChatter() as quiet:
        dec.decode(good)
    assert quiet.counts == {} and quiet.summary() is None


def test_chatter_counts_everything_written_before_exit_while_a_child_holds_the_pipe(capfd):
    """A worker process that inherited fd 2 keeps the pipe open, so no end-of-file comes: the summary
    must still count every line this process wrote before the block ended, however slowly the pump gets
    through them (CI once lost a line under load when the pump was given 2 s to reach an end-of-file),
    and must not wait for the child to exit; the child's later lines are still passed on."""
    import os
    import subprocess
    import sys
    import time

    from pipeline.quiet_fd import NativeChatter

    class SlowPump(NativeChatter):  # a starved pump thread, as on a loaded machine
        def _line(self, line: bytes) -> None:
            time.sleep(0.001)
            super()._line(line)

    capfd.readouterr()
    with SlowPump() as chatter:
        child = subprocess.Popen([sys.executable, "-c", "import os, sys; sys.stdin.read(); os.write(2, b'late child line\\n')"],
                                 stdin=subprocess.PIPE)
        os.write(2, b"".join(b"Corrupt JPEG data: %d extraneous bytes before marker 0xd9\n" % i for i in range(3000)))
    try:
        assert chatter.counts == {"libjpeg": 3000}
        assert "note: the image decoders warned 3000 time(s)" in capfd.readouterr().err
    finally:
        child.stdin.close()  # the child was alive (holding the pipe) all along; now it writes and ends
        child.wait(timeout=30)
    time.sleep(0.5)
    assert "late child line" in capfd.readouterr().err


def test_a_mute_around_tensorflows_import_keeps_the_decoder_warnings_of_threads_decoding_meanwhile(capfd):
    """Decoding overlaps TensorFlow's import, whose start-up lines are muted by pointing fd 2 (the
    whole process's) at a temporary file: a damaged image decoded by another thread in that window
    must still be counted (CI once lost its note under load), while the start-up chatter stays muted."""
    import threading

    from pipeline.quiet_fd import NativeChatter, muted_stderr

    damaged = damage_scan(_encode(_photo(), "JPEG"))
    capfd.readouterr()
    with NativeChatter() as chatter:
        with muted_stderr():
            os.write(2, b"I0000 cuda_dnn.cc:8310] Unable to register cuDNN factory\n")
            decoder = threading.Thread(target=dec.decode, args=(damaged,))
            decoder.start()
            decoder.join()
    assert chatter.counts == {"libjpeg": 1}, chatter.counts
    err = capfd.readouterr().err
    assert "note: the image decoders warned 1 time(s)" in err and "cuDNN" not in err, err


@pytest.mark.parametrize("show_on_error", [True, False])
def test_a_mute_that_ends_in_an_error_still_passes_on_the_decoder_warnings(capfd, show_on_error):
    """On an error the mute shows what it caught (the chatter may explain the failure) or, with
    show_on_error=False (Ray's connection retries), nothing but the decoder warnings: either way they
    reach the command's NativeChatter and are counted."""
    from pipeline.quiet_fd import NativeChatter, muted_stderr

    capfd.readouterr()
    with NativeChatter() as chatter:
        with pytest.raises(RuntimeError), muted_stderr(show_on_error=show_on_error):
            os.write(2, b"set-up chatter that explains the failure\n")
            os.write(2, b"Corrupt JPEG data: 3 extraneous bytes before marker 0xd9\n")
            raise RuntimeError("failed")
    assert chatter.counts == {"libjpeg": 1}, chatter.counts
    err = capfd.readouterr().err
    assert "note: the image decoders warned 1 time(s)" in err, err
    assert ("set-up chatter that explains the failure" in err) == show_on_error, err


def test_a_tiff_opencv_cannot_read_decodes_without_opencv_s_own_warning(tmp_path, capfd):
    """A 32-bit float TIFF: OpenCV printed '[ WARN:0@5.1] global grfmt_tiff.cpp ... OpenCV TIFF: ...
    32-bit samples' (naming no file) before Pillow read it, around the audit's output."""
    from PIL import Image

    from pipeline.data.decode import load_file

    path = tmp_path / "f.tif"
    Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16), mode="F").save(path)
    assert load_file(str(path), 8).shape == (8, 8, 3)
    assert "WARN" not in capfd.readouterr().err
