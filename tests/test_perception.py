import json
import shutil
import zipfile

import numpy as np
import pytest

from posetune.data.cache import decode_image
from posetune.data.perception import read_split
from posetune.errors import DataError

from helpers import legacy_capture, legacy_value, write_legacy, write_png, write_solo

Q90 = (0.0, 0.7071068, 0.0, 0.7071068)


def test_synthetic_legacy_split_reads(synth_small):
    index = read_split(synth_small, "val", "cube_position")
    assert index.format == "legacy" and len(index) == 32 and index.skipped == 0
    assert index.translations.shape == (32, 3) and index.quaternions.shape == (32, 4)
    assert np.allclose(np.linalg.norm(index.quaternions, axis=1), 1, atol=1e-6)
    assert index.images[0].endswith("rgb_2.png")  # frame numbers start at 2, as Unity's


def test_both_value_forms_several_files_skips_and_label_choice(tmp_path):
    split = tmp_path / "train"
    write_legacy(
        split,
        [
            [
                legacy_capture("RGB0/rgb_2.png", [legacy_value(t=(1, 2, 3))]),
                legacy_capture("RGB0/rgb_3.png", []),  # no object: skipped
            ],
            [
                legacy_capture(
                    "RGB0/rgb_4.png",
                    [legacy_value(t=(9, 9, 9), label="other"), legacy_value(t=(4, 5, 6), q=Q90, lists=True)],
                ),
                legacy_capture("RGB0/rgb_5.png", [legacy_value(label="other")]),  # not our label: skipped
            ],
        ],
    )
    # Keys in an unusual order must not matter.
    document = json.loads((split / "Dataset0000" / "captures_000.json").read_text())
    value = document["captures"][0]["annotations"][0]["values"][0]
    value["translation"] = {"z": 3, "x": 1, "y": 2}
    (split / "Dataset0000" / "captures_000.json").write_text(json.dumps(document))
    index = read_split(tmp_path, "train", "cube_position")
    assert index.images == ["RGB0/rgb_2.png", "RGB0/rgb_4.png"]
    assert index.skipped == 2
    assert np.allclose(index.translations, [[1, 2, 3], [4, 5, 6]])
    assert np.allclose(index.quaternions[1], Q90)


def test_captures_files_are_read_in_numeric_order(tmp_path):
    split = tmp_path / "train"
    write_legacy(split, [[legacy_capture(f"RGB0/rgb_{n}.png", [legacy_value(t=(n, 0, 1))])] for n in range(12)])
    index = read_split(tmp_path, "train", "cube_position")
    assert index.translations[:, 0].tolist() == list(range(12))  # captures_010 after captures_009


def test_solo_format(tmp_path):
    write_solo(tmp_path / "val", [((0.1, -0.2, 1.5), Q90), ((0.3, -0.1, 2.0), (0, 0, 0, 1))])
    index = read_split(tmp_path, "val", "cube_position")
    assert index.format == "solo" and len(index) == 2
    assert index.images == ["sequence.0/step0.camera.png", "sequence.1/step0.camera.png"]
    assert np.allclose(index.translations, [[0.1, -0.2, 1.5], [0.3, -0.1, 2.0]])  # not the 'other' instance


def test_zipped_dataset_with_a_top_folder(synth_small, tmp_path):
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(synth_small.rglob("*")):
            if path.is_file():
                zf.write(path, "UR3_dataset/" + path.relative_to(synth_small).as_posix())
    zipped = read_split(archive, "train", "cube_position")
    folder = read_split(synth_small, "train", "cube_position")
    assert zipped.images == folder.images and np.array_equal(zipped.translations, folder.translations)
    assert zipped.source.read(zipped.images[0]) == folder.source.read(folder.images[0])


def test_rgba_and_greyscale_images_become_rgb(tmp_path):
    write_png(tmp_path / "a.png", mode="RGBA", colour=(10, 20, 30))
    write_png(tmp_path / "b.png", mode="L", colour=(77,))
    a = decode_image((tmp_path / "a.png").read_bytes(), None, (32, 20), "a.png")
    b = decode_image((tmp_path / "b.png").read_bytes(), [0, 0, 32, 20], (16, 10), "b.png")
    assert a.shape == (20, 32, 3) and a[0, 0].tolist() == [10, 20, 30]
    assert b.shape == (10, 16, 3) and b[0, 0].tolist() == [77, 77, 77]


def test_crop_outside_the_image_is_a_clear_error(tmp_path):
    write_png(tmp_path / "a.png", size=(64, 40))
    with pytest.raises(DataError, match=r"dataset.crop \[0, 0, 100, 40\] does not fit the 64x40 image .*a.png"):
        decode_image((tmp_path / "a.png").read_bytes(), [0, 0, 100, 40], (16, 16), str(tmp_path / "a.png"))


# --- Malformed data: one clear error naming the file --------------------------------------------


def good_split(tmp_path):
    split = tmp_path / "train"
    write_legacy(split, [[legacy_capture("RGB0/rgb_2.png", [legacy_value()])]])
    return split / "Dataset0000" / "captures_000.json"


def edit_value(path, change):
    document = json.loads(path.read_text())
    change(document["captures"][0]["annotations"][0]["values"][0], document)
    path.write_text(json.dumps(document))


def test_malformed_json(tmp_path):
    path = good_split(tmp_path)
    path.write_text('{"captures": [1, 2,}')
    with pytest.raises(DataError, match=r"captures_000\.json: malformed JSON at line 1, column 20"):
        read_split(tmp_path, "train", "cube_position")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v, d: v.pop("rotation"), r"captures_000\.json: capture #0: missing field 'rotation'"),
        (lambda v, d: v["translation"].pop("z"), r"capture #0: translation: missing field 'z'"),
        (lambda v, d: d["captures"][0].pop("filename"), r"capture #0: missing field 'filename'"),
        (
            lambda v, d: v.update(translation=[0, 1]),
            r"'translation' must be an object with x, y, z or a list of 3",
        ),
        (lambda v, d: v["translation"].update(x="far"), r"'translation' must hold numbers"),
        (lambda v, d: v["translation"].update(y=float("nan")), r"non-finite value in 'translation'"),
        (lambda v, d: v["rotation"].update(w=0.2), r"rotation quaternion has norm 0\.7\d+, expected 1"),
    ],
)
def test_bad_labels(tmp_path, change, message):
    edit_value(good_split(tmp_path), change)
    with pytest.raises(DataError, match=message):
        read_split(tmp_path, "train", "cube_position")


def test_missing_image(tmp_path):
    good_split(tmp_path)
    (tmp_path / "train" / "RGB0" / "rgb_2.png").unlink()
    with pytest.raises(DataError, match=r"1 labelled image\(s\) not found: .*RGB0/rgb_2\.png"):
        read_split(tmp_path, "train", "cube_position")


def test_empty_dataset_and_missing_folders(tmp_path):
    write_legacy(tmp_path / "train", [[legacy_capture("RGB0/rgb_2.png", [])]])
    with pytest.raises(DataError, match=r"no usable samples: 1 captures, none with a 'cube_position' instance"):
        read_split(tmp_path, "train", "cube_position")
    with pytest.raises(DataError, match=r"split folder .*val not found"):
        read_split(tmp_path, "val", "cube_position")
    with pytest.raises(DataError, match="does not exist"):
        read_split(tmp_path / "nowhere", "train", "cube_position")
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="holds no Unity Perception captures"):
        read_split(tmp_path, "test", "cube_position")


def test_undecodable_image_names_the_file(tmp_path, synth_small):
    from posetune.config import load_config
    from posetune.data.loader import load_split

    shutil.copytree(synth_small, tmp_path / "d")
    broken = sorted((tmp_path / "d" / "val").glob("RGB*/rgb_5.png"))[0]
    broken.write_bytes(b"not a png")
    cfg = load_config(
        overrides=[f"dataset.root={tmp_path / 'd'}", "dataset.image_scale=32", "dataset.num_workers=0"],
        environ={},
    )
    with pytest.raises(DataError, match=r"rgb_5\.png: cannot decode image"):
        load_split(cfg, "val")


def test_bad_zip(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"nope")
    with pytest.raises(DataError, match="not a valid zip"):
        read_split(tmp_path / "x.zip", "train", "cube_position")


@pytest.mark.server
def test_a_bucket_folder_is_counted_from_its_labels_without_fetching_images(gcs, bucket, synth_small, tmp_path):
    """The search's head reads a bucket dataset's labels where they are: the same index as the
    local copy, and no image is downloaded (nothing lands in the cache)."""
    from posetune.data.tools import push_dataset
    from posetune.search.run import ensure_dataset
    from posetune.search.space import load_space

    from helpers import tiny_space

    push_dataset(str(synth_small), f"gs://{bucket}/d")
    remote = read_split(f"gs://{bucket}/d", "train", "cube_position")
    local = read_split(synth_small, "train", "cube_position")
    assert remote.images == local.images and np.array_equal(remote.translations, local.translations)
    assert remote.source.describe(remote.images[0]) == f"gs://{bucket}/d/train/{remote.images[0]}"
    space_file = tiny_space(tmp_path, synth_small, overrides={"dataset.root": f"gs://{bucket}/d"})
    space, base = load_space(space_file, [])
    assert ensure_dataset(space, base) == 96
    assert not (tmp_path / "cache").exists()
    with pytest.raises(DataError, match=f"split folder gs://{bucket}/d/nope not found"):
        read_split(f"gs://{bucket}/d", "nope", "cube_position")
    with pytest.raises(DataError, match=f"dataset.root gs://{bucket}/missing does not exist"):
        read_split(f"gs://{bucket}/missing", "train", "cube_position")
