"""Loading csv / npz / image folders into arrays, and the errors a person sees for bad data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from swarm.datasets import DatasetError, inspect_columns, load_dataset
from swarm.spec import DataSpec

pytestmark = pytest.mark.timeout(60)


def csv_spec(tmp_path: Path, text: str, label: str = "label") -> DataSpec:
    path = tmp_path / "data.csv"
    path.write_text(text)
    return DataSpec(path=str(path), format="csv", label_column=label)


def dataset_error(data: DataSpec, task: str = "classification") -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(data, task)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_csv_string_labels_sorted(tmp_path):
    ds = load_dataset(csv_spec(tmp_path, "a,b,label\n1,2,cat\n3,4,dog\n5,6.5,cat\n\n"), "classification")
    assert ds.features.dtype == np.float32 and ds.features.shape == (3, 2)
    assert ds.classes == ["cat", "dog"] and ds.targets.tolist() == [0, 1, 0]
    assert ds.feature_names == ["a", "b"]


def test_csv_numeric_labels_sort_numerically_and_canonicalise(tmp_path):
    ds = load_dataset(csv_spec(tmp_path, "x,label\n1,10\n2,9\n3,9.0\n4,2\n"), "classification")
    assert ds.classes == ["2", "9", "10"] and ds.targets.tolist() == [2, 1, 1, 0]


def test_csv_regression(tmp_path):
    ds = load_dataset(csv_spec(tmp_path, "label,x\n1.5,1\n-2,2\n"), "regression")
    assert ds.targets.dtype == np.float32 and ds.targets.tolist() == [1.5, -2.0]
    assert ds.classes is None and ds.feature_names == ["x"]


def test_csv_non_numeric_cell_names_column_and_row(tmp_path):
    message = dataset_error(csv_spec(tmp_path, "a,b,label\n1,2,0\n3,oops,1\n"))
    assert message.startswith("data.path: ") and "row 3, column 'b': not a number ('oops')" in message


def test_csv_empty_cell(tmp_path):
    assert "row 2, column 'a': not a number (an empty value)" in dataset_error(csv_spec(tmp_path, "a,label\n,0\n1,1\n"))


def test_csv_nan_is_rejected(tmp_path):
    assert "row 3, column 'a': value is not finite" in dataset_error(csv_spec(tmp_path, "a,label\n1,0\nnan,1\n"))


def test_csv_regression_label_must_be_numeric(tmp_path):
    message = dataset_error(csv_spec(tmp_path, "a,label\n1,x\n2,y\n"), task="regression")
    assert message.startswith("data.label_column: ") and "not a number ('x')" in message


def test_csv_single_class(tmp_path):
    message = dataset_error(csv_spec(tmp_path, "a,label\n1,0\n2,0\n"))
    assert message.startswith("data.label_column: ") and "at least 2 classes" in message


def test_csv_header_only_and_empty(tmp_path):
    assert "no rows" in dataset_error(csv_spec(tmp_path, "a,label\n"))
    assert "header row is required" in dataset_error(csv_spec(tmp_path, ""))


def test_csv_ragged_row(tmp_path):
    assert "line 3: 3 values, the header has 2" in dataset_error(csv_spec(tmp_path, "a,label\n1,0\n1,2,3\n"))


def test_csv_missing_label_column(tmp_path):
    data = csv_spec(tmp_path, "a,b,label\n1,2,0\n", label="y")
    with pytest.raises(DatasetError, match=r"^data\.label_column: column 'y' not found in .*data\.csv \(columns: a, b, label\)"):
        inspect_columns(data)
    assert dataset_error(data).startswith("data.label_column: ")


def test_npz_features_array(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.ones((4, 2, 3), np.uint8), y=np.array(["a", "b", "a", "b"]))
    ds = load_dataset(DataSpec(path=str(path), format="npz", label_column="y"), "classification")
    assert ds.features.shape == (4, 2, 3) and ds.features.dtype == np.float32
    assert ds.classes == ["a", "b"] and len(ds.feature_names) == 6
    np.savez(path, features=np.ones((4, 2)), other=np.ones(4), y=np.arange(4) % 2)
    assert load_dataset(DataSpec(path=str(path), format="npz", label_column="y"), "classification").features.shape == (4, 2)


def test_npz_errors(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, a=np.ones((4, 2)), b=np.ones((4, 2)), y=np.arange(4) % 2)
    data = DataSpec(path=str(path), format="npz", label_column="y")
    assert "cannot tell which array holds the features (a, b)" in dataset_error(data)
    with pytest.raises(DatasetError, match=r"^data\.label_column: array 'z' not found"):
        inspect_columns(DataSpec(path=str(path), format="npz", label_column="z"))
    np.savez(path, features=np.ones((4, 2)), y=np.arange(3))
    assert dataset_error(data).startswith("data.label_column: ")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert "cannot read" in dataset_error(DataSpec(path=str(tmp_path / "bad.npz"), format="npz", label_column="y"))


def test_image_folder(tmp_path):
    image = pytest.importorskip("PIL.Image")
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for i in range(2):
            image.new("RGB", (10, 6), colour).save(tmp_path / name / f"{i}.png")
    (tmp_path / "red" / "notes.txt").write_text("ignored")
    ds = load_dataset(DataSpec(path=str(tmp_path), format="image_folder", image_size=(4, 5)), "classification")
    assert ds.features.shape == (4, 3, 4, 5) and ds.classes == ["blue", "red"]
    assert ds.targets.tolist() == [0, 0, 1, 1]
    assert ds.features.max() == 1.0 and ds.features.min() == 0.0
    gray = load_dataset(DataSpec(path=str(tmp_path), format="image_folder", grayscale=True), "classification")
    assert gray.features.shape == (4, 1, 32, 32)
    assert inspect_columns(DataSpec(path=str(tmp_path), format="image_folder")) == ["blue", "red"]
    (tmp_path / "empty").mkdir()
    assert "class folder has no images" in dataset_error(DataSpec(path=str(tmp_path), format="image_folder"))
    message = dataset_error(DataSpec(path=str(tmp_path), format="image_folder"), task="regression")
    assert message.startswith("data.format: ")
