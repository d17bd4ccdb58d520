"""Offline stand-in for the Kaggle data: drawn hand-like shapes in the exact Kaggle layout.

Each class has its own finger pattern; skin, background, light and noise are drawn independently of
the class, and frames come in runs of near-duplicates like the real video frames, so a random split
leaks here as it does there. The external test set (`generate_external_set`) draws its scenes from
skin tones, backgrounds and lights the training frames never use. Output is a pure function of the
arguments, whatever the workers.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image, ImageDraw

from pipeline.dataset import CLASSES, NO_TEST_IMAGE, kaggle_test_dir, kaggle_train_dir
from pipeline.workers import process_pool, usable_cores

JPEG_QUALITY = 90
_SUPERSAMPLE = 2  # drawing at twice the size and box-filtering down is cheap antialiasing

# Pose signatures. The finger patterns loosely follow the ASL hand shapes, but the directions are
# spread over eight so that any two classes differ in direction or in at least two fingers: many
# ASL letters differ by one knuckle, too little to learn from a few dozen 32x32 examples.
# Fingers (thumb, index, middle, ring, pinky): E extended, B bent (hooked), C curled into the palm.
# Direction the fingers point: U up, D down, L left, R right, UL/UR/DL/DR in between.
# Spread: n fingers together, w spread apart.
_POSES: dict[str, tuple[str, str, str]] = {
    "A": ("ECCCC", "UR", "n"),
    "B": ("CEEEE", "U", "n"),
    "C": ("BBBBB", "R", "n"),
    "D": ("BECCC", "UL", "n"),
    "E": ("CBBBB", "U", "n"),
    "F": ("BBEEE", "R", "w"),
    "G": ("EECCC", "R", "n"),
    "H": ("CEECC", "L", "n"),
    "I": ("CCCCE", "UL", "n"),
    "J": ("CCCCE", "R", "w"),
    "K": ("EEECC", "UR", "w"),
    "L": ("EECCC", "L", "w"),
    "M": ("CBBBC", "UL", "n"),
    "N": ("CBBCC", "D", "n"),
    "O": ("BBBBB", "UR", "n"),
    "P": ("EEECC", "U", "w"),
    "Q": ("EECCC", "D", "n"),
    "R": ("CEBCC", "UR", "n"),
    "S": ("BCCCC", "L", "n"),
    "T": ("BBCCC", "DR", "n"),
    "U": ("CEECC", "DR", "n"),
    "V": ("CEECC", "DL", "w"),
    "W": ("CEEEC", "UL", "w"),
    "X": ("CBCCC", "DL", "n"),
    "Y": ("ECCCE", "DL", "w"),
    "Z": ("CECCC", "U", "n"),
    "del": ("EEEEE", "D", "w"),
    "space": ("ECCCC", "UL", "w"),
}
_DIRECTION_DEG = {
    "U": 0.0,
    "UR": 45.0,
    "R": 90.0,
    "DR": 135.0,
    "D": 180.0,
    "DL": -135.0,
    "L": -90.0,
    "UL": -45.0,
}
_SPLAY_DEG = {"n": (-60.0, -7.0, -2.0, 2.0, 7.0), "w": (-85.0, -26.0, -9.0, 9.0, 26.0)}

# Hand geometry in palm units (palm half-height = 1; x right, y down, angles clockwise from up).
_FINGER_BASES = ((-0.70, 0.25), (-0.55, -0.70), (-0.18, -0.80), (0.18, -0.80), (0.55, -0.70))
_FINGER_LENGTHS = (1.0, 1.2, 1.35, 1.25, 1.0)
_FINGER_WIDTHS = (0.40, 0.34, 0.34, 0.33, 0.30)
# Each state is a chain of (fraction of the finger length, turn in degrees before that segment).
_FINGER_SEGMENTS = {"E": ((0.55, 0.0), (0.45, 6.0)), "B": ((0.55, 0.0), (0.45, -100.0)), "C": ((0.32, 0.0),)}
_THUMB_SEGMENTS = {"E": _FINGER_SEGMENTS["E"], "B": ((0.5, 40.0), (0.45, 100.0)), "C": ((0.75, 125.0),)}

_LIGHT_SKIN = np.array([250.0, 215.0, 185.0])
_DARK_SKIN = np.array([85.0, 52.0, 35.0])


@dataclass(frozen=True)
class SceneStyle:
    """The scene settings a set of images is drawn from: who signs, in front of what, under which light."""

    skin_tones: tuple[tuple[float, float], ...]
    """Bands of the skin-tone line, 0 the lightest tone, 1 the darkest."""
    backgrounds: tuple[str, ...]
    """`wall` (a plain wall with a few objects), `stripes` or `checks` (patterned)."""
    lights: tuple[str, ...]
    """`white` (uneven white light), `warm` or `cool` (a colour cast), `spot` (a bright patch, dark edges)."""


# Disjoint in every setting (tests/test_synthetic.py checks): the external set asks whether a model
# recognizes the hand shape for people, rooms and lamps it has never seen.
TRAINING_SCENES = SceneStyle(skin_tones=((0.0, 0.3), (0.45, 0.8)), backgrounds=("wall",), lights=("white",))
EXTERNAL_SCENES = SceneStyle(
    skin_tones=((0.33, 0.42), (0.85, 1.0)), backgrounds=("stripes", "checks"), lights=("warm", "cool", "spot")
)
_CASTS = {"white": (1.0, 1.0, 1.0), "warm": (1.12, 1.0, 0.8), "cool": (0.82, 0.96, 1.15)}


@dataclass(frozen=True)
class _Pose:
    """Where the hand is in one frame; drifts a little from frame to frame within a run."""

    angle: float
    """Rotation of the whole hand in degrees, clockwise."""
    unit: float
    """Palm half-height in canvas pixels."""
    center: tuple[float, float]
    """Palm centre in canvas pixels."""
    splay: tuple[float, ...]
    """Per-finger deviation from the signature's direction, degrees."""


@dataclass(frozen=True)
class _Scene:
    """What stays fixed for a run: camera, background, person and light."""

    background: Image.Image
    skin: tuple[int, int, int]
    gain: np.ndarray
    """Per-pixel, per-channel light multiplier (size x size x 1 or 3): uneven or coloured lighting."""
    contrast: float
    noise: float
    tone: float
    """Where the skin lies on the light-to-dark line (SceneStyle.skin_tones)."""
    background_kind: str
    light_kind: str


def generate_synthetic_dataset(
    root: Path,
    *,
    images_per_class: int,
    frames_per_run: int = 10,
    seed: int = 0,
    size: int = 200,
    workers: int | None = None,
) -> int:
    """Writes the Kaggle layout under root (train: images_per_class frames per class; test: one
    <class>_test.jpg per class except `del`, as in the real test folder, so 28 test images).
    Returns the number of files written. Existing files of the same names are replaced; other
    files under root are left alone."""
    if images_per_class < 1 or frames_per_run < 1:
        raise ValueError(
            f"images_per_class and frames_per_run must be >= 1, got {images_per_class}, {frames_per_run}"
        )
    if seed < 0 or size < 64 or (workers is not None and workers < 1):
        raise ValueError(
            f"need seed >= 0, size >= 64, workers None or >= 1; got {seed=}, {size=}, {workers=}"
        )
    jobs = [
        (Path(root), index, images_per_class, frames_per_run, seed, size) for index in range(len(CLASSES))
    ]
    workers = min(workers or usable_cores(), len(jobs))
    if workers == 1:
        return sum(_write_class(*job) for job in jobs)
    with process_pool(workers, preload=[__name__]) as pool:
        return sum(pool.map(_write_class, *zip(*jobs, strict=True)))


def _write_class(
    root: Path, class_index: int, images_per_class: int, frames_per_run: int, seed: int, size: int
) -> int:
    """Writes one class's training frames and its test image; runs in a worker process."""
    name = CLASSES[class_index]
    train_dir = kaggle_train_dir(root) / name
    train_dir.mkdir(parents=True, exist_ok=True)
    frame = 1
    for run in range(math.ceil(images_per_class / frames_per_run)):
        rng = np.random.default_rng([seed, class_index, 0, run])
        length = min(frames_per_run, images_per_class - frame + 1)
        for image in _render_run(rng, name, length, size, TRAINING_SCENES):
            _save_jpeg(image, train_dir / f"{name}{frame}.jpg")
            frame += 1
    if name in NO_TEST_IMAGE:
        return images_per_class
    test_dir = kaggle_test_dir(root)
    test_dir.mkdir(parents=True, exist_ok=True)
    # The real test images come from a separate recording: a run of its own.
    (image,) = _render_run(np.random.default_rng([seed, class_index, 1, 0]), name, 1, size, TRAINING_SCENES)
    _save_jpeg(image, test_dir / f"{name}_test.jpg")
    return images_per_class + 1


def generate_external_set(
    root: Path, *, images_per_class: int, seed: int = 0, size: int = 200, workers: int | None = None
) -> int:
    """Writes `<root>/<class>/<class>_external<n>.jpg` for every class, each image a scene of its own
    drawn from EXTERNAL_SCENES (the layout of Kaggle's asl-alphabet-test). Returns the files written."""
    if images_per_class < 1 or seed < 0 or size < 64 or (workers is not None and workers < 1):
        raise ValueError(
            f"need images_per_class >= 1, seed >= 0, size >= 64, workers None or >= 1; got "
            f"{images_per_class=}, {seed=}, {size=}, {workers=}"
        )
    jobs = [(Path(root), index, images_per_class, seed, size) for index in range(len(CLASSES))]
    workers = min(workers or usable_cores(), len(jobs))
    if workers == 1:
        return sum(_write_external_class(*job) for job in jobs)
    with process_pool(workers, preload=[__name__]) as pool:
        return sum(pool.map(_write_external_class, *zip(*jobs, strict=True)))


def _write_external_class(root: Path, class_index: int, images_per_class: int, seed: int, size: int) -> int:
    name = CLASSES[class_index]
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(1, images_per_class + 1):
        # Stream 2: never the training frames' (0) or the test folder's (1) random numbers.
        rng = np.random.default_rng([seed, class_index, 2, number])
        (image,) = _render_run(rng, name, 1, size, EXTERNAL_SCENES)
        _save_jpeg(image, folder / f"{name}_external{number}.jpg")
    return images_per_class


def _render_run(
    rng: np.random.Generator, name: str, length: int, size: int, style: SceneStyle
) -> list[Image.Image]:
    """`length` consecutive video-like frames: one scene, a pose that drifts slightly."""
    canvas = size * _SUPERSAMPLE
    scene = random_scene(rng, size, style)
    pose = _random_pose(rng, name, canvas)
    signature = _POSES.get(name)
    frames = []
    for _ in range(length):
        image = scene.background.copy()
        if signature is not None:
            _draw_hand(ImageDraw.Draw(image), pose, signature[0], scene.skin)
        frames.append(_finish(rng, image.resize((size, size), Image.Resampling.BOX), scene))
        pose = _drift(rng, pose)
    return frames


def random_scene(rng: np.random.Generator, size: int, style: SceneStyle) -> _Scene:
    """A scene drawn from `style`. Skin tone, light and background never look at the class, on purpose."""
    tone = _in_bands(rng, style.skin_tones)
    skin = _LIGHT_SKIN + tone * (_DARK_SKIN - _LIGHT_SKIN)
    skin = np.clip(skin * rng.normal(1.0, 0.05, 3), 0, 255)
    background_kind = style.backgrounds[rng.integers(len(style.backgrounds))]
    light_kind = style.lights[rng.integers(len(style.lights))]
    return _Scene(
        background=_random_background(rng, size * _SUPERSAMPLE, skin.mean(), background_kind),
        skin=(int(skin[0]), int(skin[1]), int(skin[2])),
        gain=_light(rng, size, light_kind),
        contrast=float(rng.uniform(0.75, 1.2)),
        noise=float(rng.uniform(2.0, 7.0)),
        tone=tone,
        background_kind=background_kind,
        light_kind=light_kind,
    )


def _in_bands(rng: np.random.Generator, bands: tuple[tuple[float, float], ...]) -> float:
    """A uniform draw from the union of the bands."""
    pick = rng.uniform(0.0, sum(high - low for low, high in bands))
    for low, high in bands:
        if pick <= high - low:
            return low + pick
        pick -= high - low
    return bands[-1][1]


def _light(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """The light multiplier: a brightness ramp across the frame (a spot for `spot`), times a colour cast."""
    ys, xs = np.mgrid[0:size, 0:size] / size - 0.5
    if kind == "spot":
        centre = rng.uniform(-0.25, 0.25, 2)
        distance = np.hypot(xs - centre[0], ys - centre[1])
        gain = rng.uniform(1.1, 1.35) * np.exp(-((distance / rng.uniform(0.35, 0.5)) ** 2))[..., None]
        return np.maximum(gain, 0.25).astype(np.float32)
    direction = rng.uniform(0.0, 2.0 * math.pi)
    ramp = xs * math.cos(direction) + ys * math.sin(direction)
    gain = rng.uniform(0.75, 1.25) * (1.0 + rng.uniform(0.0, 0.6) * ramp)
    cast = np.asarray(_CASTS[kind], np.float32)
    return (gain[..., None] * (cast if kind != "white" else cast[:1])).astype(np.float32)


def _random_background(rng: np.random.Generator, canvas: int, skin_level: float, kind: str) -> Image.Image:
    """A wall in a muted room colour, darker towards one side, with a few objects in front; or, for
    `stripes` and `checks`, a patterned cloth of two such colours."""
    if kind != "wall":
        return _patterned_background(rng, canvas, skin_level, kind)
    wall = _room_colour(rng, skin_level)
    shade = np.linspace(1.0, rng.uniform(0.6, 1.0), canvas)[:, None, None]
    pixels = np.broadcast_to(wall * shade, (canvas, canvas, 3))
    if rng.uniform() < 0.5:
        pixels = pixels[::-1].transpose(1, 0, 2)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 4)):
        (x0, x1), (y0, y1) = np.sort(rng.uniform(0, canvas, (2, 2)), axis=1).tolist()
        # Objects contrast only moderately with the wall: with few examples per class, a net
        # would otherwise learn the furniture instead of the hand.
        colour = tuple(int(c) for c in np.clip(wall + rng.normal(0.0, 40.0, 3), 0, 255))
        shape = rng.integers(3)
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y1, x1, y0), fill=colour, width=int(rng.integers(2, canvas // 40)))
    return image


def _patterned_background(rng: np.random.Generator, canvas: int, skin_level: float, kind: str) -> Image.Image:
    first, second = _room_colour(rng, skin_level), _room_colour(rng, skin_level)
    ys, xs = np.mgrid[0:canvas, 0:canvas] / canvas
    angle = rng.uniform(0.0, math.pi)
    period = rng.uniform(0.08, 0.2)
    along = (xs * math.cos(angle) + ys * math.sin(angle)) / period
    if kind == "stripes":
        pattern = np.floor(along) % 2
    else:
        across = (-xs * math.sin(angle) + ys * math.cos(angle)) / period
        pattern = (np.floor(along) + np.floor(across)) % 2
    pixels = np.where(pattern[..., None] > 0, first, second)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _room_colour(rng: np.random.Generator, skin_level: float) -> np.ndarray:
    # Mostly greys and muted tints, now and then a saturated one, as in rooms people film in;
    # never close to the skin's brightness, as nobody films a sign that cannot be seen.
    grey = _away_from(rng, skin_level, 45.0)
    tint = rng.normal(0.0, 20.0 if rng.uniform() < 0.8 else 60.0, 3)
    return np.clip(grey + tint, 0.0, 255.0)


def _away_from(rng: np.random.Generator, level: float, gap: float) -> float:
    """A grey level in [25, 235] at least `gap` away from `level`."""
    below, above = max(0.0, level - gap - 25.0), max(0.0, 235.0 - level - gap)
    pick = rng.uniform(0.0, below + above)
    return 25.0 + pick if pick < below else level + gap + (pick - below)


def _random_pose(rng: np.random.Generator, name: str, canvas: int) -> _Pose:
    direction, spread = _POSES[name][1:] if name in _POSES else ("U", "n")
    angle = _DIRECTION_DEG[direction] + rng.normal(0.0, 7.0)
    unit = canvas * rng.uniform(0.19, 0.23)
    # Centre the hand (palm bottom at +1 to fingertips at -2.3), not the palm, so that no finger
    # leaves the frame, then move it around a little.
    theta = math.radians(angle)
    offset = 0.65 * unit
    center = (
        canvas / 2 - offset * math.sin(theta) + rng.uniform(-0.05, 0.05) * canvas,
        canvas / 2 + offset * math.cos(theta) + rng.uniform(-0.05, 0.05) * canvas,
    )
    splay = tuple(float(s) for s in np.asarray(_SPLAY_DEG[spread]) + rng.normal(0.0, 4.0, 5))
    return _Pose(angle=angle, unit=unit, center=center, splay=splay)


def _drift(rng: np.random.Generator, pose: _Pose) -> _Pose:
    """The next video frame: the hand moves a little, it is not posed anew."""
    x, y = pose.center
    return dataclasses.replace(
        pose,
        angle=pose.angle + rng.normal(0.0, 1.5),
        unit=pose.unit * (1.0 + rng.normal(0.0, 0.01)),
        center=(x + rng.normal(0.0, pose.unit * 0.03), y + rng.normal(0.0, pose.unit * 0.03)),
        splay=tuple(s + rng.normal(0.0, 1.5) for s in pose.splay),
    )


def _draw_hand(draw: ImageDraw.ImageDraw, pose: _Pose, fingers: str, skin: tuple[int, int, int]) -> None:
    """Forearm, palm and five fingers, each skin-filled with a darker outline so that fingers
    curled over the palm still show as knuckles."""
    edge = tuple(int(c * 0.45) for c in skin)
    line = max(2, round(pose.unit * 0.08))
    forearm = [(-0.75, 0.5), (0.75, 0.5), (0.85, 4.0), (-0.85, 4.0)]
    draw.polygon(_to_canvas(pose, forearm), fill=skin, outline=edge, width=line)
    t = np.linspace(0.0, 2.0 * math.pi, 40, endpoint=False)
    draw.polygon(
        _to_canvas(pose, np.stack([0.85 * np.cos(t), np.sin(t)], 1)), fill=skin, outline=edge, width=line
    )
    for finger in (4, 3, 2, 1, 0):  # thumb last: it lies in front of the curled fingers
        segments = (_THUMB_SEGMENTS if finger == 0 else _FINGER_SEGMENTS)[fingers[finger]]
        chain = _finger_chain(finger, segments, pose.splay[finger])
        width = _FINGER_WIDTHS[finger] * pose.unit
        _thick_line(draw, _to_canvas(pose, chain), width + 2 * line, edge)
        _thick_line(draw, _to_canvas(pose, chain), width, skin)


def _finger_chain(
    finger: int, segments: tuple[tuple[float, float], ...], direction: float
) -> list[tuple[float, float]]:
    """Joint positions of one finger in palm units, from its base to its tip."""
    x, y = _FINGER_BASES[finger]
    points = [(x, y)]
    for fraction, turn in segments:
        direction += turn
        length = fraction * _FINGER_LENGTHS[finger]
        x += length * math.sin(math.radians(direction))
        y -= length * math.cos(math.radians(direction))
        points.append((x, y))
    return points


def _thick_line(
    draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], width: float, colour: tuple[int, ...]
) -> None:
    draw.line(points, fill=colour, width=max(1, round(width)), joint="curve")
    radius = width / 2  # PIL lines have square ends; fingers have round tips
    for x, y in (points[0], points[-1]):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)


def _to_canvas(pose: _Pose, points: ArrayLike) -> list[tuple[float, float]]:
    """Palm units to canvas pixels: rotate, scale, move."""
    theta = math.radians(pose.angle)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    xy = np.asarray(points, dtype=float) @ rotation.T * pose.unit + np.asarray(pose.center)
    return [tuple(p) for p in xy.tolist()]


def _finish(rng: np.random.Generator, image: Image.Image, scene: _Scene) -> Image.Image:
    """Camera effects: contrast, uneven light that flickers a little, sensor noise."""
    pixels = np.asarray(image, dtype=np.float32)
    pixels = (pixels - 128.0) * scene.contrast + 128.0
    pixels *= scene.gain * np.float32(rng.normal(1.0, 0.015))
    pixels += rng.normal(0.0, scene.noise, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _save_jpeg(image: Image.Image, path: Path) -> None:
    # Write under a temporary name and rename, so a crash never leaves a truncated JPEG behind
    # that a later stage would count as data.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temporary, format="JPEG", quality=JPEG_QUALITY)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
