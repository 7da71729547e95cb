import hashlib
import io
import math

import numpy as np
import pytest
from PIL import Image

from posetune.data import synth
from posetune.data.geometry import quat_multiply
from posetune.data.perception import read_split
from posetune.errors import DataError


def cube_mask(rgb: np.ndarray) -> np.ndarray:
    """Cube faces have a zero channel; backgrounds never go below a fifth of their max."""
    rgb = rgb.astype(int)
    return (rgb.min(axis=2) <= 0.1 * rgb.max(axis=2)) & (rgb.max(axis=2) >= 20)


def project(t) -> tuple[float, float]:
    return synth.CX + synth.FOCAL_PX * t[0] / t[2], synth.CY - synth.FOCAL_PX * t[1] / t[2]


def test_labelled_centre_projects_onto_the_cube(synth_small):
    index = read_split(synth_small, "train", "cube_position")
    assert len(index) == 96
    for name, t in list(zip(index.images, index.translations, strict=True))[:40]:
        rgb = np.asarray(Image.open(io.BytesIO(index.source.read(name))).convert("RGB"))
        mask = cube_mask(rgb)
        u, v = project(t)
        assert mask[round(v), round(u)], f"{name}: projected centre ({u:.0f}, {v:.0f}) is not on the cube"
        rows, cols = np.nonzero(mask)
        # The silhouette's centroid sits within a few pixels of the projected centre.
        assert abs(cols.mean() - u) < 6 and abs(rows.mean() - v) < 6
        assert 120 < mask.sum() < 2500  # a 0.1 m cube at 1.2-2 m: roughly 12-40 px across


def test_known_rotation_gives_the_expected_quaternion(rng):
    scene = synth.sample_scene(rng, camera_jitter=False)
    scene.yaw_deg = 90.0
    _, q = synth.scene_label(scene)
    # Camera pitched down 20 deg (Unity Euler x = 20), cube yawed 90 deg: the relative rotation
    # is Rx(-20) * Ry(90); written out by hand with s = sin, c = cos of the half angles.
    s1, c1 = math.sin(math.radians(10)), math.cos(math.radians(10))
    s2 = c2 = math.sqrt(0.5)
    assert np.allclose(q, [-s1 * c2, c1 * s2, -s1 * s2, c1 * c2], atol=1e-9)


def test_labels_match_the_example_label_of_the_tutorial():
    # Unity's example label t = (-0.3449, -0.1085, 1.7134) sits on our table top within reach.
    t = np.array([-0.3449, -0.1085, 1.7134])
    pitch = synth.quat_from_euler(synth.CAMERA_PITCH_DEG, 0, 0)
    world = synth.CAMERA_POSITION + synth.quat_to_matrix(pitch) @ t
    assert world[1] == pytest.approx(synth.TABLE_TOP_Y + synth.CUBE_SIZE / 2, abs=2e-3)
    assert synth.REACH_M[0] <= np.hypot(world[0], world[2]) <= synth.REACH_M[1]


def test_no_jitter_labels_are_cubes_resting_on_the_table(tmp_path):
    synth.generate(tmp_path, {"train": 50}, seed=7, camera_jitter=False, workers=1)
    index = read_split(tmp_path, "train", "cube_position")
    pitch = synth.quat_to_matrix(synth.quat_from_euler(synth.CAMERA_PITCH_DEG, 0, 0))
    world = synth.CAMERA_POSITION + index.translations.astype(float) @ pitch.T
    assert np.allclose(world[:, 1], synth.TABLE_TOP_Y + synth.CUBE_SIZE / 2, atol=1e-5)
    reach = np.hypot(world[:, 0], world[:, 2])
    assert reach.min() >= 0.2 - 1e-5 and reach.max() <= 0.4 + 1e-5
    # Every label is Rx(-20 deg) * (a yaw): x/w and z/y are both -tan(10 deg).
    q = index.quaternions.astype(float)
    pitch_inverse = synth.quat_from_euler(-synth.CAMERA_PITCH_DEG, 0, 0)
    for label in q:
        yaw = quat_multiply(synth.quat_conjugate(pitch_inverse), label)
        assert abs(yaw[0]) < 1e-5 and abs(yaw[2]) < 1e-5  # a pure rotation about y


def test_deterministic_for_a_seed_whatever_the_worker_count(tmp_path):
    synth.generate(tmp_path / "a", {"train": 12, "val": 4}, seed=5, workers=1)
    synth.generate(tmp_path / "b", {"train": 12, "val": 4}, seed=5, workers=2)
    synth.generate(tmp_path / "c", {"train": 12, "val": 4}, seed=6, workers=2)

    def digest(root):
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return hashlib.sha256(
            b"".join(p.relative_to(root).as_posix().encode() + p.read_bytes() for p in files)
        ).hexdigest()

    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_png_encoder_round_trips_through_pillow(rng):
    frame = synth.render(synth.sample_scene(rng))
    assert frame.shape == (400, 650, 3)
    decoded = np.asarray(Image.open(io.BytesIO(synth.encode_png(frame))))
    assert np.array_equal(decoded, frame)
    noise = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(synth.encode_png(noise)))), noise)


def test_existing_split_is_not_overwritten_and_nothing_partial_is_left(tmp_path):
    synth.generate(tmp_path, {"train": 3}, seed=0, workers=1)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError, match="already exists"):
        synth.generate(tmp_path, {"train": 3}, seed=1, workers=1)
    synth.generate(tmp_path, {"train": 4}, seed=1, workers=1, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before == ["train"]
    assert len(read_split(tmp_path, "train", "cube_position")) == 4


def test_interrupted_generation_leaves_no_split(tmp_path, monkeypatch):
    def fail(*_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_write_metadata", fail)
    with pytest.raises(RuntimeError):
        synth.generate(tmp_path, {"train": 3}, seed=0, workers=1)
    assert list(tmp_path.iterdir()) == []
