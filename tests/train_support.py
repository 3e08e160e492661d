"""Small nets the training tests share: two weight groups (and batch norm), many runs a test on 8 x 8 arrays; and
one such net trained on a folder of named classes (`trained_on_folder`)."""

from __future__ import annotations

from pathlib import Path

TINY = """\
net tiny
input image: 1 x 8 x 8
c1 = conv(image, 4, size=3) | relu | maxpool(2, stride=2)
f2 = fc(c1, 10)
output f2
"""

# TINY with batch norm after its conv (the same names besides)
NORMED = TINY.replace("| relu |", "| batchnorm | relu |")

# TINY scoring three classes, for folders of cat, dog and owl
THREE_CLASSES = TINY.replace("fc(c1, 10)", "fc(c1, 3)")
# no measured mean, no flips, no colour noise, no loading process: what a test computes by hand
PLAIN = ("--mean", "none", "--no-flip", "--pca-noise", "0", "--workers", "0")


def trained_on_folder(root: Path, per_class: int, seed: int, steps: int) -> tuple[Path, Path, Path]:
    """THREE_CLASSES trained `steps` steps (batch 4, PLAIN) on a folder of classes cat, dog and owl, each holding
    `per_class` random 8 x 8 gray PNGs (seeded): (net, run folder, image folder), under `root`."""
    import numpy as np
    from PIL import Image

    from netdsl.cli.main import main

    folder = root / "images"
    rng = np.random.default_rng(seed)
    for name in ("cat", "dog", "owl"):
        (folder / name).mkdir(parents=True)
        for index in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / name / f"{index}.png")
    net, run = root / "tiny.net", root / "run"
    net.write_text(THREE_CLASSES)
    args = ["train", str(net), "--data", str(folder), "--batch", "4", "--steps", str(steps), "--out", str(run)]
    assert main([*args, *PLAIN]) == 0
    return net, run, folder
