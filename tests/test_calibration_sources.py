"""quantkit.calibration_samples: one preprocessing for every calibration source (the CLI's --calib runs it too)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import quantkit
from quantkit.datasets import digits
from quantkit.errors import CalibrationDataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture()
def pixels() -> np.ndarray:
    """Six 5x7 RGB images, (N, C, H, W) uint8, covering 0 and 255."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 3, 5, 7), dtype=np.uint8)
    a[0, 0, 0, 0], a[0, 0, 0, 1] = 0, 255
    return a


def _folder(tmp_path, pixels):
    folder = tmp_path / "imgs"
    (folder / "nested").mkdir(parents=True)
    for i, a in enumerate(pixels):
        Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0))).save(folder / "nested" / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_every_integer_source_is_scaled_like_images(tmp_path, pixels):
    expect = torch.from_numpy(pixels).float() / 255
    np.save(tmp_path / "u8.npy", pixels)
    np.save(tmp_path / "i64.npy", pixels.astype(np.int64))
    torch.save(torch.from_numpy(pixels.astype(np.int32)), tmp_path / "i32.pt")
    torch.save((torch.from_numpy(pixels.astype(np.int16)), torch.zeros(6)), tmp_path / "pairs.pt")
    np.save(tmp_path / "u16.npy", pixels.astype(np.uint16))
    sources = [_folder(tmp_path, pixels), tmp_path / "u8.npy", tmp_path / "i64.npy", tmp_path / "i32.pt",
               tmp_path / "pairs.pt", tmp_path / "u16.npy", str(tmp_path / "u8.npy"), pixels,
               torch.from_numpy(pixels)]
    for src in sources:
        x = quantkit.calibration_samples(src, (3, 5, 7))
        assert x.dtype == torch.float32 and x.shape == (6, 3, 5, 7)
        torch.testing.assert_close(x, expect, rtol=0, atol=1e-7, msg=str(type(src)))
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_mean_std_apply_to_every_source_alike(tmp_path, pixels):
    expect = (torch.from_numpy(pixels).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD).view(1, 3, 1, 1)
    np.save(tmp_path / "u8.npy", pixels)
    for src in (_folder(tmp_path, pixels), tmp_path / "u8.npy", pixels.astype(np.int64),
                torch.from_numpy(pixels).float() / 255):  # float data in the [0, 1] scale
        x = quantkit.calibration_samples(src, (3, 5, 7), mean=MEAN, std=STD)
        torch.testing.assert_close(x, expect, rtol=1e-6, atol=1e-6)
    one = quantkit.calibration_samples(pixels, mean=0.5, std=0.25)  # one value for every channel
    torch.testing.assert_close(one, (torch.from_numpy(pixels).float() / 255 - 0.5) / 0.25)
    only_std = quantkit.calibration_samples(pixels, std=2.0)  # the missing one is 0 (mean) or 1 (std)
    torch.testing.assert_close(only_std, torch.from_numpy(pixels).float() / 255 / 2)


def test_float_data_is_used_as_it_is():
    x = torch.randn(4, 2, 3, dtype=torch.float64) * 50
    torch.testing.assert_close(quantkit.calibration_samples(x), x.float())
    h = torch.randn(4, 3).half()
    assert quantkit.calibration_samples(h).dtype == torch.float32
    torch.testing.assert_close(quantkit.calibration_samples(torch.tensor([[True, False]])), torch.tensor([[1.0, 0.0]]))


def test_digits_default_is_what_the_digits_models_train_on():
    ref = digits("train")[0]
    torch.testing.assert_close(quantkit.calibration_samples("digits"), ref)
    big = quantkit.calibration_samples("digits", (3, 16, 16), limit=10)
    torch.testing.assert_close(big, F.interpolate(ref[:10], size=(16, 16), mode="bilinear",
                                                  align_corners=False).expand(-1, 3, -1, -1), rtol=1e-5, atol=1e-5)
    raw = digits("train", standardize=False)[0]
    assert float(raw.min()) == 0.0 and float(raw.max()) == 1.0
    torch.testing.assert_close(quantkit.calibration_samples("digits", mean=0.5, std=0.5), (raw - 0.5) / 0.5)


def test_tensors_are_fitted_to_the_input_shape_like_images(pixels):
    x = quantkit.calibration_samples(pixels, (1, 10, 14))
    ref = F.interpolate((torch.from_numpy(pixels).float() / 255).mean(1, keepdim=True), size=(10, 14),
                        mode="bilinear", align_corners=False)
    torch.testing.assert_close(x, ref)
    assert quantkit.calibration_samples(pixels, limit=2).shape[0] == 2


@pytest.mark.parametrize("source, kwargs, match", [
    (np.full((2, 1, 4, 4), -3, np.int16), {}, r"int16 values span -3..-3, not 8-bit pixels"),
    (np.full((2, 1, 4, 4), 1000, np.int64), {}, r"save these samples as floats"),
    (np.zeros((2, 3, 4, 4), np.uint8), dict(mean=(0.1, 0.2)), r"mean has 2 values but the samples have 3"),
    (np.zeros((2, 3, 4, 4), np.uint8), dict(std=0.0), r"std=0.0 must be positive"),
    (np.zeros((2, 3, 4, 4), np.uint8), dict(mean="abc"), r"mean='abc' must be a number"),
    (np.zeros((2, 3, 4, 4), np.uint8), dict(input_shape=(3, 0, 4)), r"positive integers"),
    (np.zeros((2, 3, 4, 4), np.uint8), dict(input_shape=(5,)), r"only \(N, C, H, W\) data is resized"),
    (np.zeros((7,), np.float32), {}, r"no batch dimension"),
    (np.zeros((0, 3), np.float32), {}, r"no samples"),
    (np.full((2, 3), np.nan, np.float32), {}, r"NaN/Inf"),
    (torch.empty(2, 3, device="meta"), {}, r"meta device"),
    (torch.zeros(2, 3, dtype=torch.complex64), {}, r"complex"),
    ([1, 2, 3], {}, r"expected 'digits', a folder"),
])
def test_bad_calibration_sources(source, kwargs, match):
    with pytest.raises(CalibrationDataError, match=match):
        quantkit.calibration_samples(source, **kwargs)


def test_bad_calibration_files(tmp_path):
    with pytest.raises(CalibrationDataError, match="no such file"):
        quantkit.calibration_samples(tmp_path / "missing.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationDataError, match="has no image files"):
        quantkit.calibration_samples(tmp_path / "empty", (3, 8, 8))
    Image.new("RGB", (4, 4)).save(tmp_path / "empty" / "a.png")
    with pytest.raises(CalibrationDataError, match="needs an input shape"):
        quantkit.calibration_samples(tmp_path / "empty")
    (tmp_path / "noise.pt").write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(CalibrationDataError, match="cannot be loaded safely") as exc:
        quantkit.calibration_samples(tmp_path / "noise.pt")
    assert "\x1b" not in str(exc.value)
    torch.save({"labels": torch.zeros(3)}, tmp_path / "dict.pt")
    with pytest.raises(CalibrationDataError, match="got dict"):
        quantkit.calibration_samples(tmp_path / "dict.pt")
