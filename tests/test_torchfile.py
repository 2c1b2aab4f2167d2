"""pipeline.backbones.torchfile: legacy torch state dicts read without torch, strided views, bad files."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from pipeline.backbones import lite
from pipeline.backbones.torchfile import TorchFileError, load_state_dict


# --- a tiny legacy-format writer (pickle protocol 2 opcodes written by hand, no torch) ---------

def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _tensor(key: str, stype: str, numel: int, offset: int, size, stride) -> bytes:
    pid = _tuple([_str("storage"), _global("torch", stype), _str(key), _str("cpu"), _int(numel), b"N"])
    args = [pid + b"Q", _int(offset), _tuple([_int(s) for s in size]), _tuple([_int(s) for s in stride]),
            b"\x89", _global("collections", "OrderedDict") + b")R"]
    return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(args) + b"R"


def _legacy_file(tensors: dict[str, bytes], storages: dict[str, np.ndarray]) -> bytes:
    head = b"".join(pickle.dumps(o, protocol=2) for o in (
        0x1950A86A20F9469CFC6C, 1001,
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    body = b"".join(_str(k) + v for k, v in tensors.items())
    state = b"\x80\x02" + _global("collections", "OrderedDict") + b")R(" + body + b"u."
    data = b"".join(struct.pack("<q", a.size) + a.astype(a.dtype.newbyteorder("<")).tobytes()
                    for a in storages.values())
    return head + state + pickle.dumps(list(storages), protocol=2) + data


@pytest.fixture(scope="module")
def lite0_path():
    return lite.weights_path("efficientnet_lite0")


def test_strided_views_are_rebuilt_not_reshaped(tmp_path):
    storage = np.arange(6, dtype=np.float32)
    path = tmp_path / "small.pth"
    path.write_bytes(_legacy_file(
        {"t": _tensor("s0", "FloatStorage", 6, 0, (3, 2), (1, 3)),  # transpose of a 2x3
         "every_other": _tensor("s0", "FloatStorage", 6, 1, (2,), (2,)),  # shares storage s0
         "ids": _tensor("s1", "LongStorage", 3, 0, (3,), (1,))},
        {"s0": storage, "s1": np.array([7, 8, 9], dtype=np.int64)}))
    sd = load_state_dict(path)
    assert list(sd) == ["t", "every_other", "ids"]
    np.testing.assert_array_equal(sd["t"], storage.reshape(2, 3).T)
    assert not np.array_equal(sd["t"], storage.reshape(3, 2))  # what a naive reshape would give
    assert sd["t"].flags["C_CONTIGUOUS"] and sd["t"].flags["OWNDATA"]
    np.testing.assert_array_equal(sd["every_other"], [1.0, 3.0])
    assert sd["ids"].dtype == np.int64 and sd["ids"].tolist() == [7, 8, 9]


def test_view_beyond_storage_is_rejected(tmp_path):
    path = tmp_path / "oob.pth"
    path.write_bytes(_legacy_file({"t": _tensor("s0", "FloatStorage", 4, 0, (3, 2), (1, 3))},
                                  {"s0": np.zeros(4, np.float32)}))
    with pytest.raises(TorchFileError, match="oob.pth.*storage"):
        load_state_dict(path)


def test_foreign_globals_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    good = _legacy_file({"t": _tensor("s0", "FloatStorage", 1, 0, (1,), (1,))}, {"s0": np.zeros(1, np.float32)})
    path.write_bytes(good.replace(_global("collections", "OrderedDict"), _global("os", "system"), 1))
    with pytest.raises(TorchFileError, match="refusing to load global os.system"):
        load_state_dict(path)


def test_lite0_file_layout(lite0_path):
    sd = load_state_dict(lite0_path)
    assert len(sd) == 296 and list(sd)[0] == "_conv_stem.weight" and list(sd)[-1] == "_fc.bias"
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)  # stored HWIO-strided (1, 32, 288, 96)
    assert sd["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert all(v.dtype == np.float32 for k, v in sd.items() if not k.endswith("num_batches_tracked"))


def test_every_lite0_tensor_is_used(lite0_path):
    sd = load_state_dict(lite0_path)
    model = lite.build_lite("efficientnet_lite0", (224, 224, 3), weights=None, include_top=True)
    used = lite.load_lite_weights(model, "efficientnet_lite0", sd)
    assert len(used) == len(set(used))
    assert set(used) == {k for k in sd if not k.endswith("num_batches_tracked")}
    # the HWIO-strided stem kernel lands in Keras as the plain OIHW -> HWIO transpose
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0],
                                  sd["_conv_stem.weight"].transpose(2, 3, 1, 0))


def test_missing_and_extra_tensors_are_reported(lite0_path):
    sd = load_state_dict(lite0_path)
    model = lite.build_lite("efficientnet_lite0", (32, 32, 3), weights=None)
    missing = {k: v for k, v in sd.items() if not k.startswith("_blocks.3._bn1.")}
    with pytest.raises(lite.LiteWeightsError, match=r"_blocks\.3\._bn1\.weight missing"):
        lite.load_lite_weights(model, "efficientnet_lite0", missing)
    with pytest.raises(lite.LiteWeightsError, match="1 tensors not used.*_blocks.16"):
        lite.load_lite_weights(model, "efficientnet_lite0", {**sd, "_blocks.16._bn1.weight": np.zeros(3)})


def _assert_one_line_error(path, *words):
    with pytest.raises(TorchFileError) as info:
        load_state_dict(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    assert isinstance(info.value, ValueError)
    for word in words:
        assert word in msg


def test_truncated_files(tmp_path, lite0_path):
    data = lite0_path.read_bytes()
    for cut, word in [(10, "truncated"), (20_000, "truncated"), (len(data) // 2, "truncated"),
                      (len(data) - 1, "truncated")]:
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(data[:cut])
        _assert_one_line_error(path, word)


def test_foreign_files(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    (tmp_path / "image.png").write_bytes(png.getvalue())
    (tmp_path / "notes.txt").write_text("just some text\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with zipfile.ZipFile(tmp_path / "new.pth", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
    _assert_one_line_error(tmp_path / "image.png", "not a torch file")
    _assert_one_line_error(tmp_path / "notes.txt", "not a torch file")
    _assert_one_line_error(tmp_path / "empty.pth", "not a torch file")
    _assert_one_line_error(tmp_path / "plain.pkl", "magic number")
    _assert_one_line_error(tmp_path / "new.pth", "zip-format")
    _assert_one_line_error(tmp_path / "missing.pth", "cannot read")
