"""A fourth planted dataset, unlike the others: handwritten digits on photographs.

The ten digits of scikit-learn's ``load_digits`` (1,797 scans of 8x8, upscaled with jitter;
the same scan recurs across splits, as a small real dataset's writers do) drawn in one of
eight colours, with a thin or a bold stroke, on a crop of one of six photographs that the
shapes do not use; 32x32 RGB. Handed over as a plain Parquet manifest like
``make_shapes.py``'s (a ``digit`` column naming the classes, ``color`` and ``background``
columns, ``group``: the planted truth). Planted in train only, other rates than the shapes':

- a rare colour with a decoy: magenta is 1% of threes and 70% of eights;
- a rare background with a decoy: sevens are on ``grass`` 1% of the time, ones 70%;
- one class with two planted modes: fives are lime 2% of the time (sixes 60%) and on
  ``moon`` 2% (nines 60%);
- a rare value of an attribute the manifest does not carry: twos are thin 2% of the time
  (zeros 80%); ``stroke`` is left out of the manifest, so the audit should report it unnamed.

    python benchmarks/make_digits.py --out runs/digits [--scale 0.5]
"""

from __future__ import annotations

import functools

import numpy as np
from make_shapes import Design, build_design, cli, composite

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLORS = {
    "magenta": (225, 40, 200),
    "lime": (150, 240, 40),
    "orange": (240, 140, 20),
    "teal": (20, 140, 140),
    "gold": (225, 185, 40),
    "pink": (250, 150, 190),
    "brown": (140, 80, 30),
    "white": (245, 245, 245),
}
BACKGROUNDS = ["brick", "grass", "gravel", "moon", "hubble_deep_field", "retina"]
VALUES = {"color": list(COLORS), "background": BACKGROUNDS, "stroke": ["thin", "bold"]}
#: (class, attribute, value, rate in train, decoy class, decoy rate)
PLANTED = [
    ("three", "color", "magenta", 0.01, "eight", 0.7),
    ("seven", "background", "grass", 0.01, "one", 0.7),
    ("five", "color", "lime", 0.02, "six", 0.6),
    ("five", "background", "moon", 0.02, "nine", 0.6),
    ("two", "stroke", "thin", 0.02, "zero", 0.8),
]


@functools.lru_cache(maxsize=1)
def _scans() -> dict[int, np.ndarray]:
    """scikit-learn's digit scans by class, as float [0, 1] 8x8 arrays."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return {k: d.images[d.target == k] / 16.0 for k in range(10)}


def digit_mask(digit: int, stroke: str, rng):
    """A 96x96 greyscale mask of one scan of ``digit``, upscaled to a jittered size and
    position; a thin stroke keeps the scan's darkest core, a bold one its whole trace."""
    from PIL import Image

    scans = _scans()[digit]
    scan = Image.fromarray((scans[rng.integers(len(scans))] * 255).astype(np.uint8))
    side = int(rng.uniform(56, 72))
    big = np.asarray(scan.resize((side, side), Image.BICUBIC), float)
    cut = 170 if stroke == "thin" else 60
    canvas = np.zeros((96, 96))
    y, x = (96 - side) // 2 + rng.integers(-6, 7, 2)
    canvas[y : y + side, x : x + side] = np.where(big > cut, 255.0, 0.0)
    return Image.fromarray(canvas.astype(np.uint8))


def draw(label: str, attrs: dict[str, str], rng, textures) -> np.ndarray:
    mask = functools.partial(digit_mask, DIGITS.index(label), attrs["stroke"], rng)
    return composite(mask, COLORS[attrs["color"]], attrs["background"], rng, textures)


DESIGN = Design(
    classes=DIGITS,
    class_column="digit",
    values=VALUES,
    planted=PLANTED,
    carried=("color", "background"),
    backgrounds=BACKGROUNDS,
    draw=draw,
)


def build(out: str, scale: float = 1.0, seed: int = 0) -> str:
    """Write the digits' ``OUT/examples.parquet``; returns its path."""
    return build_design(DESIGN, out, scale, seed)


def main(argv=None) -> None:
    cli(DESIGN, __doc__, argv)


if __name__ == "__main__":
    main()
