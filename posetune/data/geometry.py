"""Quaternion and camera maths shared by the synthetic generator and the tests.

Quaternions are (x, y, z, w) like Unity's. Unity's world and camera frames are left-handed
(+x right, +y up, +z forward) but its quaternion algebra is the ordinary Hamilton one, so the
usual formulas apply unchanged: a point p of an object with rotation q at position c, seen
from a camera at e with rotation r, has camera-frame coordinates  r^-1 (c + q p q^-1 - e) r.
"""

from __future__ import annotations

import math

import numpy as np


def quat_from_axis_angle(axis: str, degrees: float) -> np.ndarray:
    """Rotation of `degrees` about a principal axis ('x', 'y' or 'z'), as (x, y, z, w)."""
    half = math.radians(degrees) / 2
    q = np.zeros(4)
    q["xyz".index(axis)] = math.sin(half)
    q[3] = math.cos(half)
    return q


def quat_from_euler(x_deg: float, y_deg: float, z_deg: float) -> np.ndarray:
    """Unity's Quaternion.Euler: rotate about z, then x, then y (q = qy * qx * qz)."""
    qx = quat_from_axis_angle("x", x_deg)
    qy = quat_from_axis_angle("y", y_deg)
    qz = quat_from_axis_angle("z", z_deg)
    return quat_multiply(quat_multiply(qy, qx), qz)


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product a * b of (x, y, z, w) quaternions (apply b, then a)."""
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ]
    )


def quat_conjugate(q: np.ndarray) -> np.ndarray:
    return np.array([-q[0], -q[1], -q[2], q[3]])


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """3x3 rotation matrix of a unit (x, y, z, w) quaternion (acts on column vectors)."""
    x, y, z, w = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def project_unity(points_cam: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Pixel (u, v) of camera-frame points (N, 3) in Unity's frame (+y up; image rows go down)."""
    x, y, z = points_cam[..., 0], points_cam[..., 1], points_cam[..., 2]
    return np.stack([cx + fx * x / z, cy - fy * y / z], axis=-1)
