from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_dataset, write_idx
from hpo.errors import DataError
from hpo.learn import data
from hpo.settings.config import Augment


def test_reads_gzipped_and_plain_idx(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    plain = write_idx(tmp_path / "plain-idx3-ubyte", images)
    gz = write_idx(tmp_path / "packed-idx3-ubyte", images, gz=True)
    assert np.array_equal(data.read_idx(plain), images)
    assert np.array_equal(data.read_idx(gz), images)


def test_truncated_file_is_refused(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 28, 28)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.read_idx(path)


def test_truncated_gzip_is_refused(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 28, 28)), gz=True)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match="cannot read"):
        data.read_idx(path)


def test_wrong_magic_is_refused(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx(path)


def test_images_and_labels_of_different_lengths(tmp_path):
    make_dataset(tmp_path, n_train=20)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(19) % 10, gz=True)
    with pytest.raises(DataError, match="holds 20 images but .* holds 19 labels"):
        data.load_split(tmp_path, "train")


def test_load_split(fake_data_dir):
    images, labels = data.load_split(fake_data_dir, "train")
    assert images.shape == (200, 28, 28) and labels.dtype == np.int64


def test_explicit_dir_wins_and_must_be_complete(tmp_path, fake_data_dir, monkeypatch):
    monkeypatch.delenv("HPO_DATA_DIR", raising=False)
    assert data.find_data_dir(fake_data_dir) == fake_data_dir
    monkeypatch.setenv("HPO_DATA_DIR", str(fake_data_dir))
    assert data.find_data_dir() == fake_data_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        data.find_data_dir(empty)
    message = str(info.value)
    assert "lacks some Fashion-MNIST files" in message
    assert "--data-dir" in message and "dataset-fashion-mnist" in message and "torchvision" in message


def test_stratified_split_is_deterministic_disjoint_and_stratified():
    labels = np.repeat(np.arange(10), 100)
    np.random.default_rng(3).shuffle(labels)
    rest, held = data.stratified_split(labels, 0.1, seed=7)
    rest2, held2 = data.stratified_split(labels, 0.1, seed=7)
    assert np.array_equal(rest, rest2) and np.array_equal(held, held2)
    assert not set(rest) & set(held)
    assert len(rest) + len(held) == len(labels)
    assert np.bincount(labels[held], minlength=10).tolist() == [10] * 10
    _, other = data.stratified_split(labels, 0.1, seed=8)
    assert not np.array_equal(held, other)


def test_augmentation_keeps_shape_and_pixels():
    x = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 10:18, 4:8] = 200  # an off-centre bar, so flips and shifts move it
    g = torch.Generator().manual_seed(0)
    out = data.augment_batch(x, Augment(crop_padding=2, hflip=True), g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # A shift by at most 2 px keeps the whole bar inside the frame.
    assert (out.reshape(64, -1) == 200).sum(1).tolist() == [32] * 64
    assert not torch.equal(out, x)
    assert not torch.equal(out, data.augment_batch(x, Augment(crop_padding=2, hflip=True), g))


def test_batches_cover_every_image_once():
    d = data.DeviceData(np.zeros((10, 28, 28), np.uint8), np.arange(10), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([y for _, y in d.batches(3, g)])
    assert sorted(seen.tolist()) == list(range(10))
    assert [len(y) for _, y in d.batches(3, g, drop_last=True)] == [3, 3, 3]


def test_real_files_have_the_official_sizes(real_data_dir):
    train_images, train_labels = data.load_split(real_data_dir, "train")
    test_images, _ = data.load_split(real_data_dir, "test")
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert np.bincount(train_labels).tolist() == [6000] * 10


def test_random_erasing_fills_one_rectangle_in_the_chosen_share_of_images():
    x = torch.zeros(2000, 1, 28, 28, dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = data.random_erase(x, 0.5, g)
    touched = (out != 0).flatten(1).any(1)
    assert 0.45 < touched.float().mean() < 0.55  # about p of the images
    areas = (out != 0).flatten(1).sum(1)[touched].float() / 784
    assert areas.max() <= 0.45 and areas.mean() > 0.1  # rectangles of 2-40 % (random fill is 0 now and then)
    assert torch.equal(data.random_erase(x, 0.0, g), x)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(data.random_erase(x, 1.0, g1), data.random_erase(x, 1.0, g2))  # seeded, so resumable
