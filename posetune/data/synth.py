"""A synthetic stand-in for Unity's pose-estimation scene, written as a legacy Perception dataset.

It reproduces the tutorial's geometry (camera pose and field of view, image size, a 0.1 m cube
resting on a table within the robot's reach, yaw uniform in [0, 360), light randomisation,
optional camera jitter) with flat-shaded faces in six distinct colours, a cast shadow and
randomised walls, tables and clutter. Labels are exact: they come from the same numbers the
renderer projects. Everything runs without Unity, so tests and laptops have data.

Colour rule the label test relies on: every cube face has at least one zero channel (pure
primaries and secondaries, only ever scaled), while every background pixel keeps its smallest
channel above a fifth of its largest. A pixel is "cube" iff min(rgb) <= 0.1 * max(rgb).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

try:  # ISA-L deflate: ~7x faster than zlib at level 1 on these frames
    from isal import isal_zlib as _deflate
except ImportError:  # pragma: no cover - isal is a dependency, but keep the generator working
    _deflate = zlib

from posetune.data.geometry import (
    project_unity,
    quat_conjugate,
    quat_from_axis_angle,
    quat_from_euler,
    quat_multiply,
    quat_to_matrix,
)
from posetune.errors import DataError

# --- The tutorial scene (Unity world frame: metres, +y up, +z forward) -----------------------
IMAGE_WIDTH, IMAGE_HEIGHT = 650, 400
VERTICAL_FOV_DEG = 60.0
FOCAL_PX = (IMAGE_HEIGHT / 2) / math.tan(math.radians(VERTICAL_FOV_DEG / 2))  # ~346.4 px
CX, CY = IMAGE_WIDTH / 2, IMAGE_HEIGHT / 2
CAMERA_POSITION = np.array([0.0, 1.5, -1.4])
CAMERA_PITCH_DEG = 20.0  # Unity Euler x: positive looks down
CUBE_SIZE = 0.1
# Table height and robot base are not in the tutorial text; they are solved from its example
# label (t = (-0.345, -0.109, 1.713) puts the cube centre at world y = 0.812).
TABLE_TOP_Y = 0.762
ROBOT_BASE = np.array([0.0, TABLE_TOP_Y, 0.0])
REACH_M = (0.2, 0.4)  # planar distance of the cube from the robot base
TABLE_HALF_EXTENT = (0.9, 0.75)  # x, z
JITTER_POSITION_M = 0.005
JITTER_ROTATION_DEG = 1.0

LABEL_NAME = "cube_position"
BOX3D_DEFINITION_ID = "0bfbe00d-00fa-4555-88d1-471b58449f5c"
CAPTURES_PER_FILE = 150  # as Unity's writer
FIRST_FRAME = 2  # Unity's first captured frame is not 0; readers must not assume it

# Face normals (object frame) and their colours: pure primaries/secondaries, one per face.
_FACE_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=float)
_FACE_COLOURS = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 1], [0, 0, 1], [0, 1, 1]], dtype=float)
_CUBE_CORNERS = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float) * (CUBE_SIZE / 2)
# Corner indices of each face, in order around the face.
_FACES = [
    [4, 5, 7, 6],  # +x
    [0, 2, 3, 1],  # -x
    [2, 6, 7, 3],  # +y
    [0, 1, 5, 4],  # -y
    [1, 3, 7, 5],  # +z
    [0, 4, 6, 2],  # -z
]


@dataclass
class Scene:
    """Everything random about one frame."""

    cube_position: np.ndarray  # world (3,)
    yaw_deg: float
    camera_position: np.ndarray  # world (3,)
    camera_rotation: np.ndarray  # world quaternion (x, y, z, w)
    light_intensity: float
    light_elevation_deg: float
    light_azimuth_deg: float
    light_colour: np.ndarray  # (3,) each in [0.5, 1]
    wall_top: np.ndarray  # (3,) in [0, 1]
    wall_bottom: np.ndarray
    table_colour: np.ndarray
    clutter: list[tuple[list[float], np.ndarray, bool]]  # (box in px, colour, is_ellipse)


def _muted_colour(rng: np.random.Generator, low: float = 0.3, high: float = 0.85) -> np.ndarray:
    """A low-saturation colour: channels within a factor ~1.4 of each other."""
    base = rng.uniform(low, high)
    return np.clip(base * rng.uniform(0.8, 1.1, size=3), 0.2, 1.0)


def sample_scene(rng: np.random.Generator, camera_jitter: bool = True) -> Scene:
    radius = rng.uniform(*REACH_M)
    angle = rng.uniform(0, 2 * math.pi)
    cube = ROBOT_BASE + np.array([radius * math.cos(angle), CUBE_SIZE / 2, radius * math.sin(angle)])
    camera_position = CAMERA_POSITION.copy()
    euler = np.array([CAMERA_PITCH_DEG, 0.0, 0.0])
    if camera_jitter:
        camera_position += rng.uniform(-JITTER_POSITION_M, JITTER_POSITION_M, size=3)
        euler += rng.uniform(-JITTER_ROTATION_DEG, JITTER_ROTATION_DEG, size=3)
    clutter = []
    for _ in range(rng.integers(0, 5)):
        x0, y0 = rng.uniform(0, IMAGE_WIDTH), rng.uniform(0, IMAGE_HEIGHT * 0.45)
        w, h = rng.uniform(20, 160), rng.uniform(20, 120)
        clutter.append(([x0, y0, x0 + w, y0 + h], _muted_colour(rng), bool(rng.integers(0, 2))))
    return Scene(
        cube_position=cube,
        yaw_deg=float(rng.uniform(0, 360)),
        camera_position=camera_position,
        camera_rotation=quat_from_euler(*euler),
        light_intensity=float(rng.uniform(0.9, 1.1)),
        light_elevation_deg=float(rng.uniform(40, 80)),
        light_azimuth_deg=float(rng.uniform(-180, 180)),
        light_colour=rng.uniform(0.5, 1.0, size=3),
        wall_top=_muted_colour(rng),
        wall_bottom=_muted_colour(rng),
        table_colour=_muted_colour(rng, 0.45, 0.9),
        clutter=clutter,
    )


def cube_rotation(scene: Scene) -> np.ndarray:
    """World rotation of the cube: a yaw about world up (it rests on the table)."""
    return quat_from_axis_angle("y", scene.yaw_deg)


def scene_label(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(translation, quaternion) of the cube in Unity's camera frame, as Perception labels it."""
    camera_inverse = quat_conjugate(scene.camera_rotation)
    translation = quat_to_matrix(camera_inverse) @ (scene.cube_position - scene.camera_position)
    rotation = quat_multiply(camera_inverse, cube_rotation(scene))
    return translation, rotation / np.linalg.norm(rotation)


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(np.round(colour * 255), 0, 255))


def render(scene: Scene) -> np.ndarray:
    """The frame as a (IMAGE_HEIGHT, IMAGE_WIDTH, 3) uint8 array."""
    el, az = math.radians(scene.light_elevation_deg), math.radians(scene.light_azimuth_deg)
    to_light = np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    light = scene.light_intensity * scene.light_colour
    ambient = 0.4

    # Every 3D point of the frame, projected in one go: table (4), shadow (8), cube (8).
    hx, hz = TABLE_HALF_EXTENT
    table = ROBOT_BASE + np.array([[-hx, 0, -hz], [hx, 0, -hz], [hx, 0, hz], [-hx, 0, hz]])
    cube_matrix = quat_to_matrix(cube_rotation(scene))
    cube = scene.cube_position + _CUBE_CORNERS @ cube_matrix.T
    lift = cube[:, 1] - TABLE_TOP_Y  # shadow: corners slid along the light onto the table
    shadow = cube - lift[:, None] * (to_light / to_light[1])
    world_to_camera = quat_to_matrix(quat_conjugate(scene.camera_rotation))
    camera = (np.concatenate([table, shadow, cube]) - scene.camera_position) @ world_to_camera.T
    uv = project_unity(camera, FOCAL_PX, FOCAL_PX, CX, CY).tolist()
    table_px, shadow_px, cube_px = uv[:4], uv[4:12], uv[12:]

    # Wall: a vertical gradient, lit by the light's intensity only; one pixel wide,
    # stretched by Pillow (10x faster than broadcasting in numpy).
    t = np.linspace(0, 1, IMAGE_HEIGHT)[:, None]
    column = (1 - t) * scene.wall_top + t * scene.wall_bottom
    column = np.clip(column * scene.light_intensity * 255, 0, 255).astype(np.uint8)
    image = Image.fromarray(column[:, None]).resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    for box, colour, is_ellipse in scene.clutter:
        (draw.ellipse if is_ellipse else draw.rectangle)(box, fill=_rgb(colour * scene.light_intensity))

    draw.polygon(
        [tuple(p) for p in table_px],
        fill=_rgb(scene.table_colour * light * (ambient + (1 - ambient) * to_light[1])),
    )
    shadow_colour = _rgb(scene.table_colour * light * ambient)
    for face in _FACES:
        draw.polygon([tuple(shadow_px[i]) for i in face], fill=shadow_colour)

    # Cube: flat-shaded faces that face the camera (a convex body needs no depth sort).
    normals = _FACE_NORMALS @ cube_matrix.T
    for face, normal, colour in zip(_FACES, normals, _FACE_COLOURS, strict=True):
        if np.dot(normal, cube[face].mean(axis=0) - scene.camera_position) >= 0:
            continue
        shade = ambient + (1 - ambient) * max(0.0, float(np.dot(normal, to_light)))
        draw.polygon([tuple(cube_px[i]) for i in face], fill=_rgb(colour * light * shade))
    return np.asarray(image)


# --- Writing a legacy Perception dataset ------------------------------------------------------


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as a PNG file: filter None, one IDAT chunk.

    Why not Pillow's encoder: it always runs adaptive row filtering plus zlib, ~3 ms for a
    650x400 frame, which caps the generator near 400 frames/s on 2 cores. Flat-shaded frames
    compress well without filtering, and ISA-L deflates them in ~0.1 ms. Any PNG reader
    (Pillow in the tests) decodes the result.
    """
    height, width, _ = rgb.shape
    rows = np.zeros((height, 1 + 3 * width), np.uint8)  # column 0: filter type 0 (None)
    rows[:, 1:] = rgb.reshape(height, 3 * width)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", _deflate.compress(rows.tobytes(), 1)),
            _png_chunk(b"IEND", b""),
        ]
    )


def _frame_rng(seed: int, split_index: int, frame: int) -> np.random.Generator:
    """Per-frame generator: the output does not depend on how frames are spread over workers."""
    return np.random.default_rng(np.random.SeedSequence([seed, split_index, frame]))


def _guid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _render_chunk(args: tuple) -> list[dict]:
    """Worker task: render and write a chunk of frames; return their capture records."""
    split_dir, rgb_folder, seed, split_index, frames, camera_jitter = args
    records = []
    for frame in frames:
        rng = _frame_rng(seed, split_index, frame)
        scene = sample_scene(rng, camera_jitter)
        filename = f"{rgb_folder}/rgb_{frame}.png"
        (Path(split_dir) / filename).write_bytes(encode_png(render(scene)))
        records.append(_capture_record(scene, frame, filename, rng))
    return records


def _capture_record(scene: Scene, frame: int, filename: str, rng: np.random.Generator) -> dict:
    translation, rotation = scene_label(scene)
    xyz = lambda v: {"x": float(v[0]), "y": float(v[1]), "z": float(v[2])}  # noqa: E731
    return {
        "id": _guid(rng),
        "sequence_id": _guid(rng),
        "step": 0,
        "timestamp": 0.0,
        "frame": frame,
        "sensor": {
            "sensor_id": "camera",
            "ego_id": "ego",
            "modality": "camera",
            "translation": scene.camera_position.tolist(),
            "rotation": scene.camera_rotation.tolist(),
            "camera_intrinsic": _unity_projection_block(),
        },
        "ego": {"ego_id": "ego", "translation": [0.0, 0.0, 0.0], "rotation": [0.0, 0.0, 0.0, 1.0]},
        "filename": filename,
        "format": "PNG",
        "annotations": [
            {
                "id": "box3d",
                "annotation_definition": BOX3D_DEFINITION_ID,
                "values": [
                    {
                        "label_id": 1,
                        "label_name": LABEL_NAME,
                        "instance_id": 1,
                        "translation": xyz(translation),
                        "size": xyz([CUBE_SIZE] * 3),
                        "rotation": {**xyz(rotation[:3]), "w": float(rotation[3])},
                        "velocity": xyz([0, 0, 0]),
                        "acceleration": xyz([0, 0, 0]),
                    }
                ],
            }
        ],
    }


def _unity_projection_block() -> list[list[float]]:
    """The 3x3 block of Unity's projection matrix (what Perception stores as camera_intrinsic)."""
    f = 1 / math.tan(math.radians(VERTICAL_FOV_DEG / 2))
    return [[f * IMAGE_HEIGHT / IMAGE_WIDTH, 0.0, 0.0], [0.0, f, 0.0], [0.0, 0.0, -1.0006]]


def _write_metadata(dataset_dir: Path, records: list[dict]) -> None:
    dataset_dir.mkdir(parents=True)
    definitions = {
        "version": "0.0.1",
        "annotation_definitions": [
            {
                "id": BOX3D_DEFINITION_ID,
                "name": "bounding box 3D",
                "description": "Bounding boxes in 3D space (camera frame)",
                "format": "JSON",
                "spec": [{"label_id": 1, "label_name": LABEL_NAME}],
            }
        ],
    }
    (dataset_dir / "annotation_definitions.json").write_text(json.dumps(definitions, indent=1))
    for number, start in enumerate(range(0, len(records), CAPTURES_PER_FILE)):
        captures = {"version": "0.0.1", "captures": records[start : start + CAPTURES_PER_FILE]}
        (dataset_dir / f"captures_{number:03d}.json").write_text(json.dumps(captures))


def check_output(out: Path, splits: dict[str, int], overwrite: bool) -> None:
    """Refuse negative counts and existing splits before any work starts."""
    for name, count in splits.items():
        if count < 0:
            raise DataError(f"--{name} must be >= 0, got {count}")
        if count and (out / name).exists() and not overwrite:
            raise DataError(f"{out / name} already exists; remove it or pass --overwrite")


def generate(
    out: str | Path,
    splits: dict[str, int],
    seed: int = 0,
    workers: int | None = None,
    camera_jitter: bool = True,
    overwrite: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Path]:
    """Write each split (name -> number of frames) as a legacy Perception dataset in out/<name>.

    Deterministic for a seed whatever the worker count. Each split is written to a hidden
    temporary folder and renamed into place when complete, so an interrupted run leaves nothing.
    """
    out = Path(out)
    check_output(out, splits, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    written = {}
    context = multiprocessing.get_context("fork")
    with context.Pool(workers) as pool:
        for split_index, (name, count) in enumerate(splits.items()):
            if count == 0:
                continue
            written[name] = _generate_split(pool, out, name, split_index, count, seed, camera_jitter, on_progress)
    return written


def _generate_split(pool, out, name, split_index, count, seed, camera_jitter, on_progress) -> Path:
    rng = _frame_rng(seed, split_index, -1 & 0xFFFFFFFF)
    dataset_folder, rgb_folder = f"Dataset{_guid(rng)}", f"RGB{_guid(rng)}"
    partial = out / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        (partial / rgb_folder).mkdir(parents=True)
        frames = list(range(FIRST_FRAME, FIRST_FRAME + count))
        chunk = max(1, min(64, count // (4 * pool._processes) or 1))
        tasks = [
            (str(partial), rgb_folder, seed, split_index, frames[i : i + chunk], camera_jitter)
            for i in range(0, count, chunk)
        ]
        records: list[dict] = []
        for chunk_records in pool.imap_unordered(_render_chunk, tasks):
            records += chunk_records
            if on_progress:
                on_progress(len(chunk_records))
        records.sort(key=lambda r: r.pop("frame"))
        _write_metadata(partial / dataset_folder, records)
        final = out / name
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        return final
    finally:
        shutil.rmtree(partial, ignore_errors=True)
