"""Procedural "toy faces" drawn with OpenCV: the demo's source domain and its target domains.

Every face is a dictionary of parameters drawn from one seed (`sample_params`): head position, size and roll,
yaw (features shift sideways), skin tone, eye size, iris colour and gaze, brows, mouth width, curve and
opening, nose, hair style and colour, shirt colour and a two-colour background. `render(params, style)`
draws the same face in one of three styles, so source and target share geometry exactly:

    source      the flat-shaded colour face
    sketch      a pencil sketch of the same drawing (colour-dodge of the grey image on warm paper, grain)
    sunglasses  the colour face wearing dark sunglasses (an attribute change; everything else identical)

`geometry(params)` gives the face's known geometry as a vector in image coordinates (see GEOMETRY_NAMES):
the toy network learns to read it from an image, and the testbed uses it for correspondence.
Drawing is at 4x the output size with anti-aliased primitives, then area-downsampled.
"""

import math
import os

import cv2
import numpy as np

STYLES = ("source", "sketch", "sunglasses")
GEOMETRY_NAMES = (
    "head_x", "head_y", "head_w", "head_h", "roll", "yaw",
    "left_eye_x", "left_eye_y", "right_eye_x", "right_eye_y", "eye_size",
    "gaze_x", "gaze_y", "mouth_x", "mouth_y", "mouth_curve", "mouth_open",
)
SUPERSAMPLE = 4

SKIN_TONES = np.array([[255, 226, 200], [240, 196, 150], [214, 160, 110], [168, 112, 70], [110, 70, 45]], float)
HAIR_COLOURS = np.array([[25, 20, 20], [90, 55, 30], [150, 100, 50], [220, 190, 120], [170, 70, 30], [190, 190, 195]], float)
IRIS_COLOURS = np.array([[70, 45, 25], [60, 110, 170], [70, 130, 80], [110, 90, 60]], float)
HAIR_STYLES = ("short", "long", "bun", "bald")


def sample_params(seed):
    """All parameters of one face, deterministic per integer seed (unlimited distinct faces)."""
    rng = np.random.default_rng(seed)
    u = rng.uniform
    tone = u(0, len(SKIN_TONES) - 1)
    low = int(tone)
    skin = SKIN_TONES[low] + (tone - low) * (SKIN_TONES[min(low + 1, len(SKIN_TONES) - 1)] - SKIN_TONES[low])
    head_w = u(0.19, 0.26)
    return {
        "bg_top": u(60, 240, 3), "bg_bottom": u(60, 240, 3),
        "head_x": u(0.42, 0.58), "head_y": u(0.45, 0.56), "head_w": head_w, "head_h": head_w * u(1.15, 1.35),
        "roll": u(-15, 15), "yaw": u(-1, 1),
        "skin": skin * u(0.95, 1.05, 3),
        "eye_size": u(0.13, 0.23), "eye_spacing": u(0.34, 0.44), "eye_height": u(-0.14, -0.02),
        "iris": IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))],
        "gaze_x": u(-1, 1), "gaze_y": u(-1, 1),
        "brow_tilt": u(-22, 22), "brow_lift": u(1.4, 2.2), "brow_thickness": u(0.03, 0.07),
        "mouth_width": u(0.30, 0.60), "mouth_curve": u(-1, 1), "mouth_open": max(0.0, u(-0.6, 1)), "mouth_height": u(0.40, 0.55),
        "nose_length": u(0.12, 0.25),
        "hair_style": HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
        "hair": HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * u(0.85, 1.15),
        "hair_volume": u(1.05, 1.25), "fringe": u(-0.62, -0.36),
        "shirt": u(30, 230, 3),
        "grain_seed": int(rng.integers(2**31)),
    }


def _face_frame(p):
    """Face coordinates (u right, v down, in units of head half-width / half-height) -> unit-square points."""
    angle = math.radians(p["roll"])
    cos, sin = math.cos(angle), math.sin(angle)

    def to_image(u, v):
        x, y = u * p["head_w"], v * p["head_h"]
        return p["head_x"] + cos * x - sin * y, p["head_y"] + sin * x + cos * y

    return to_image


def _feature_uv(p):
    """Face-frame centres of the eyes and mouth: yaw slides them sideways."""
    shift = 0.22 * p["yaw"]
    eye_v = p["eye_height"]
    return {
        "left_eye": (-p["eye_spacing"] + shift, eye_v),
        "right_eye": (p["eye_spacing"] + shift, eye_v),
        "mouth": (shift * 0.8, p["mouth_height"]),
        "nose": (shift * 1.1, (eye_v + p["mouth_height"]) / 2),
    }


def geometry(params):
    """The face's known geometry: a float32 vector in the order of GEOMETRY_NAMES (positions in [0, 1])."""
    p = params
    to_image = _face_frame(p)
    uv = _feature_uv(p)
    left = to_image(*uv["left_eye"])
    right = to_image(*uv["right_eye"])
    mouth = to_image(*uv["mouth"])
    values = [
        p["head_x"], p["head_y"], p["head_w"], p["head_h"], p["roll"] / 15, p["yaw"],
        left[0], left[1], right[0], right[1], p["eye_size"],
        p["gaze_x"], p["gaze_y"], mouth[0], mouth[1], p["mouth_curve"], p["mouth_open"],
    ]
    return np.array(values, np.float32)


class _Canvas:
    """Drawing helpers in unit-square coordinates on a supersampled canvas."""

    def __init__(self, size):
        self.size = size
        self.image = np.zeros((size, size, 3), np.uint8)

    def px(self, x, y):
        return int(round(x * self.size * 16)), int(round(y * self.size * 16))  # 4 fractional bits

    def length(self, value):
        return max(1, int(round(value * self.size * 16)))

    def ellipse(self, centre, axes, angle, colour, thickness=-1, start=0, end=360):
        thick = thickness if thickness < 0 else max(1, int(round(thickness * self.size)))
        cv2.ellipse(self.image, self.px(*centre), (self.length(axes[0]), self.length(axes[1])), angle, start, end,
                    _bgr(colour), thick, cv2.LINE_AA, 4)

    def polygon(self, points, colour):
        pts = np.array([self.px(*q) for q in points], np.int32)
        cv2.fillPoly(self.image, [pts], _bgr(colour), cv2.LINE_AA, 4)

    def polyline(self, points, colour, thickness):
        pts = np.array([self.px(*q) for q in points], np.int32)
        cv2.polylines(self.image, [pts], False, _bgr(colour), max(1, int(round(thickness * self.size))), cv2.LINE_AA, 4)


def _bgr(colour):
    r, g, b = (float(c) for c in np.clip(colour, 0, 255))
    return b, g, r


def _draw_face(p, size, sunglasses):
    canvas = _Canvas(size * SUPERSAMPLE)
    top, bottom = np.asarray(p["bg_top"]), np.asarray(p["bg_bottom"])
    ramp = np.linspace(0, 1, canvas.size)[:, None, None]
    canvas.image[:] = (top + ramp * (bottom - top))[..., ::-1].astype(np.uint8)
    to_image = _face_frame(p)
    uv = _feature_uv(p)
    w, h, roll = p["head_w"], p["head_h"], p["roll"]
    hair, skin = p["hair"], p["skin"]

    canvas.ellipse((p["head_x"], p["head_y"] + h * 1.75), (w * 2.0, h * 0.9), 0, p["shirt"])  # shoulders
    canvas.polygon([to_image(-0.35, 0.6), to_image(0.35, 0.6), to_image(0.4, 1.45), to_image(-0.4, 1.45)], skin * 0.9)  # neck
    if p["hair_style"] == "long":
        canvas.ellipse(to_image(0, 0.25), (w * p["hair_volume"] * 1.1, h * 1.15), roll, hair * 0.9)
    if p["hair_style"] == "bun":
        canvas.ellipse(to_image(0, -1.2), (w * 0.45, w * 0.45), roll, hair)
    canvas.ellipse((p["head_x"], p["head_y"]), (w, h), roll, skin)  # head
    for side in (-1, 1):  # ears
        canvas.ellipse(to_image(side * 0.98, 0.0), (w * 0.14, h * 0.16), roll, skin * 0.92)
    if p["hair_style"] != "bald":  # hair cap over the top of the head, down to the fringe line
        vol = p["hair_volume"]
        canvas.ellipse((p["head_x"], p["head_y"]), (w * vol, h * vol), roll, hair, -1, 180, 360)
        cap = [to_image(math.cos(t) * vol, min(p["fringe"], math.sin(t) * vol)) for t in np.linspace(math.pi, 2 * math.pi, 24)]
        canvas.polygon([to_image(-vol, 0.0)] + cap + [to_image(vol, 0.0)], hair)
    eye_r = p["eye_size"] * w
    for name in ("left_eye", "right_eye"):
        centre = to_image(*uv[name])
        squash = 1 - 0.25 * abs(p["yaw"]) * (1 if (name == "left_eye") == (p["yaw"] > 0) else 0)
        canvas.ellipse(centre, (eye_r * squash, eye_r * 0.8), roll, (250, 250, 250))
        iris = (centre[0] + p["gaze_x"] * eye_r * 0.35, centre[1] + p["gaze_y"] * eye_r * 0.25)
        canvas.ellipse(iris, (eye_r * 0.5, eye_r * 0.5), 0, p["iris"])
        canvas.ellipse(iris, (eye_r * 0.25, eye_r * 0.25), 0, (10, 10, 10))
        canvas.ellipse(centre, (eye_r * squash, eye_r * 0.8), roll, skin * 0.55, 0.004)  # eyelid outline
        u_eye, v_eye = uv[name]
        side = -1 if name == "left_eye" else 1
        tilt = math.radians(p["brow_tilt"]) * side
        half = p["eye_size"] * 1.2
        v_brow = v_eye - p["brow_lift"] * p["eye_size"] * w / h
        brow = [to_image(u_eye - half, v_brow - math.tan(tilt) * half * w / h * -1),
                to_image(u_eye + half, v_brow + math.tan(tilt) * half * w / h * -1)]
        canvas.polyline(brow, hair * 0.7, p["brow_thickness"] * w * 2)
    if sunglasses:
        lens = (eye_r * 1.9, eye_r * 1.45)
        for name in ("left_eye", "right_eye"):
            canvas.ellipse(to_image(*uv[name]), lens, roll, (18, 18, 24))
            canvas.ellipse(to_image(uv[name][0] - 0.06, uv[name][1] - 0.05), (lens[0] * 0.35, lens[1] * 0.2), roll - 20, (90, 95, 110))
        bridge = [to_image(uv["left_eye"][0] + p["eye_size"] * 1.5, uv["left_eye"][1] - 0.03),
                  to_image(uv["right_eye"][0] - p["eye_size"] * 1.5, uv["right_eye"][1] - 0.03)]
        canvas.polyline(bridge, (18, 18, 24), 0.02 * w * 2)
        for side, name in ((-1, "left_eye"), (1, "right_eye")):
            arm = [to_image(uv[name][0] + side * p["eye_size"] * 1.7, uv[name][1] - 0.05), to_image(side * 0.98, uv[name][1] - 0.02)]
            canvas.polyline(arm, (18, 18, 24), 0.015 * w * 2)
    nu, nv = uv["nose"]
    canvas.polyline([to_image(nu, nv - p["nose_length"] / 2), to_image(nu + 0.08, nv + p["nose_length"] / 2), to_image(nu - 0.04, nv + p["nose_length"] / 2 + 0.02)],
                    skin * 0.7, 0.012 * 2)
    mu, mv = uv["mouth"]
    half = p["mouth_width"] / 2
    ts = np.linspace(-1, 1, 15)
    upper = [to_image(mu + t * half, mv - p["mouth_curve"] * 0.12 * (1 - t * t)) for t in ts]
    if p["mouth_open"] > 0.05:
        lower = [to_image(mu + t * half, mv - p["mouth_curve"] * 0.12 * (1 - t * t) + p["mouth_open"] * 0.16 * (1 - t * t)) for t in ts[::-1]]
        canvas.polygon(upper + lower, (120, 30, 40))
    canvas.polyline(upper, (150, 60, 60), 0.014 * 2)
    return canvas.image  # BGR uint8, supersampled


PAPER_RGB = (245, 235, 215)  # the sketches' warm white paper


def _pencil(bgr, params):
    """Colour-dodge pencil sketch of the drawing on warm paper with deterministic grain."""
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
    blur = cv2.GaussianBlur(255 - grey, (0, 0), sigmaX=bgr.shape[0] / 60)
    dodge = np.clip(grey * 255 / np.maximum(255 - blur, 1), 0, 255)
    lines = (dodge / 255) ** 2.2  # darken the strokes
    rng = np.random.default_rng(params["grain_seed"])
    grain = cv2.GaussianBlur(rng.normal(0, 1, grey.shape).astype(np.float32), (0, 0), 1.5) * 0.04
    paper = np.array(PAPER_RGB[::-1], np.float32)  # BGR
    return (np.clip(lines + grain, 0, 1)[..., None] * paper).astype(np.uint8)


def render(params, style="source", size=64):
    """One face as an RGB uint8 array [size, size, 3]."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; one of {STYLES}")
    big = _draw_face(params, size, sunglasses=style == "sunglasses")
    if style == "sketch":
        big = _pencil(big, params)
    small = cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(small[..., ::-1])


def render_seed(seed, style="source", size=64):
    return render(sample_params(seed), style, size)


def render_batch(seeds, style="source", size=64):
    """Faces for a list of seeds as a float tensor [N, 3, size, size] in [-1, 1]."""
    import torch

    images = np.stack([render_seed(int(s), style, size) for s in seeds])  # [N, H, W, 3]
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, H, W]


# seeds of the committed ten-image target sets; the pretraining set uses seeds 0 .. n_train-1 and
# evaluation draws from EVAL_SEED_START on, so the three never overlap
TARGET_SEEDS = range(1_000_000, 1_000_010)
EVAL_SEED_START = 2_000_000
TARGET_STYLES = ("sketch", "sunglasses")


def write_target_sets(root, size=32):
    """demo/targets/<style>/00.png .. 09.png: the committed few-shot target sets."""
    from PIL import Image

    for style in TARGET_STYLES:
        folder = os.path.join(root, style)
        os.makedirs(folder, exist_ok=True)
        for k, seed in enumerate(TARGET_SEEDS):
            Image.fromarray(render_seed(seed, style, size)).save(os.path.join(folder, f"{k:02d}.png"))


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets")
    write_target_sets(out)
    print(f"wrote {len(TARGET_SEEDS)} images per style {TARGET_STYLES} to {out}")
