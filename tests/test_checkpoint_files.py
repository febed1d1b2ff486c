"""Wrong files given as a checkpoint: each is named by its first bytes in one short line."""

import io
import zipfile

import numpy as np
import pytest
import torch
from conftest import assert_cli_errors, write_random_images
from PIL import Image

from checkpoints import CheckpointError, load_checkpoint, read_checkpoint
from stylegan2 import Generator


def image_bytes(fmt):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def zip_bytes():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("weights/readme.txt", "not a checkpoint")
    return buffer.getvalue()


def torch_bytes():
    buffer = io.BytesIO()
    torch.save({"g_ema": Generator(8, style_dim=4, n_mlp=1, channel_cap=4).state_dict()}, buffer)
    return buffer.getvalue()


CASES = [
    ("image.pt", image_bytes("PNG"), "is a PNG image, not a PyTorch checkpoint (.pt) or network pickle (.pkl)"),
    ("image.jpg.pt", image_bytes("JPEG"), "is a JPEG image, not a PyTorch checkpoint"),
    ("image.gif.pt", image_bytes("GIF"), "is a GIF image, not a PyTorch checkpoint"),
    ("image.webp.pt", image_bytes("WEBP"), "is a WebP image, not a PyTorch checkpoint"),
    ("image.bmp.pt", image_bytes("BMP"), "is a BMP image, not a PyTorch checkpoint"),
    ("notes.pt", b"hello, these are my notes\n", "is a text file (starting 'hello, these are my note'), not a PyTorch checkpoint"),
    ("download.pt", b"<!DOCTYPE html>\n<html><body>Sign in</body></html>", "is an HTML page (a failed download?), not a PyTorch checkpoint"),
    ("archive.pt", zip_bytes(), "is a zip archive without data.pkl, not a PyTorch checkpoint"),
    ("empty.pt", b"", "is an empty file (0 bytes), not a PyTorch checkpoint"),
    ("cut.pt", torch_bytes()[:300], "is a truncated or damaged PyTorch checkpoint (its zip directory is missing; copy or download it again)"),
    ("cut.pkl", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01G", "is a truncated network pickle"),
    ("noise.pt", bytes([7, 200, 13, 99, 0, 255, 31, 4] * 64), "is unrecognised binary data (starting 07 c8 0d 63 00 ff), not a PyTorch checkpoint"),
]


@pytest.mark.parametrize("name, content, expected", CASES, ids=[case[0] for case in CASES])
def test_wrong_files_say_what_they_are(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(path))
    message = str(info.value)
    assert message.startswith(f"{path} {expected}")
    assert "\n" not in message and len(message) - len(str(path)) < 160


def test_plain_pickle_is_not_a_resume_checkpoint(tmp_path):
    path = tmp_path / "network.pkl"
    path.write_bytes(b"\x80\x04N.")
    with pytest.raises(CheckpointError, match="plain Python pickle, not a PyTorch checkpoint"):
        read_checkpoint(str(path))


def test_refused_objects_name_the_culprit(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"g": {}, "payload": zipfile.ZipInfo("x")}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(path))
    assert str(info.value) == f"{path} holds pickled Python objects besides tensors (zipfile.ZipInfo); refusing to unpickle it"


def test_cdc_reports_a_wrong_file_in_one_line(tmp_path):
    image = tmp_path / "source.pt"
    image.write_bytes(image_bytes("PNG"))
    target = write_random_images(tmp_path / "target", n=2, size=(16, 16))
    assert_cli_errors("cdc.py", [(["--source", str(image), "--target", target], f"{image} is a PNG image")],
                      ["--device", "cpu", "--iter", "1", "--out", str(tmp_path / "out")])
