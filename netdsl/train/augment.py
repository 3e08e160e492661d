"""The paper's preprocessing of one image: the shorter side scaled, a crop to the net's input (random, with
a horizontal flip, for training; the centre for validation), PCA colour noise, the mean (and std) taken
away, and the ten test views. For training also VGG's scale jittering, Inception's random-resized crops and
Darknet's rotation and colour jitter (in HSV).

An image is cut as an H x W x C array of 0..255 values (a data set of arrays keeps its own scale) and
handed to the net as C x H x W float32. Gray and RGB images are converted to the net's channels as Pillow
converts them ("L" <-> "RGB"). Nothing here draws from a global random generator: training draws come from
a generator the caller seeds per sample (`sample_rng`).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from netdsl.errors import NetError, os_hint
from netdsl.files import parse_json

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})
PREPROCESS_FORMAT = 1  # the version of Preprocess.to_json's layout
PIXEL_RANGE = 255.0  # colour statistics are of pixels / 255, as the published ImageNet eigenvalues are
VIEW_COUNTS = (1, 10)
LUMA = (0.299, 0.587, 0.114)  # Pillow's RGB -> L weights (ITU-R 601-2)
# The most pixels an image may have once its shorter side is scaled (Pillow's own bound on a decoded image,
# about 89 million): a thin image (a 118-byte PNG of 40,000 x 1) would otherwise take gigabytes.
MAX_RESIZED_PIXELS = 89_478_485
MAX_SIZE = 65_536  # the largest `size` a saved preprocessing record may hold


def import_pillow():
    """The module PIL.Image, or a NetError saying how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise NetError("reading images needs Pillow", hint="pip install 'netdsl[train]'") from None
    return Image


def image_mode(channels: int, where: str | None = None) -> str:
    if channels not in (1, 3):
        raise NetError(
            f"the net takes {channels}-channel inputs; images give 1 (gray) or 3 (RGB)",
            where=where,
            hint="give the data as an .npz array with that many channels",
        )
    return "L" if channels == 1 else "RGB"


def images_in(folder: Path, root: Path | None = None) -> list[Path]:
    """The image files in `folder` and its subfolders, sorted; files and folders whose names start with a dot
    (below `root`, default `folder`) are left out, as a file manager hides them."""
    root = folder if root is None else root
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def open_image(path: Path, channels: int):
    """The image at `path` decoded whole, turned upright by its EXIF orientation (as viewers show a camera's
    photo) and converted to gray ("L") or RGB: a Pillow image, or for a gray image of more than 8 bits an
    H x W x `channels` float32 array (`wide_pixels`). A NetError naming the file when it cannot be read."""
    pil = import_pillow()
    mode = image_mode(channels, str(path))
    try:
        with warnings.catch_warnings():
            # Pillow warns of what it reads past (a photo's damaged EXIF block, a tag beyond the file's end) at
            # every read, in every loader worker: the pixels are what count, and an unreadable file is an error
            warnings.simplefilter("ignore", UserWarning)
            return _decode(pil, path, channels, mode)
    except FileNotFoundError as error:
        raise NetError(f"no such file: {path}", where=str(path), hint=os_hint(error)) from None
    except Exception as error:  # Pillow's decoders raise OSError, SyntaxError, struct.error, ...: all mean unreadable
        raise NetError(
            f"cannot read {path} as an image ({error})", where=str(path), hint="replace or delete the file"
        ) from None


def _decode(pil, path: Path, channels: int, mode: str):
    with pil.open(path) as image:
        fmt = image.format  # the file's: a turned image has none
        image = upright(image)
        wide = wide_pixels(image, fmt)  # decodes the whole file, as convert does, so a truncated one fails here
        if wide is not None:
            return match_channels(wide[..., None], channels, str(path))
        return image.convert(mode)


EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how a camera held the picture (1: upright)


def upright(image):
    """`image` turned by its EXIF orientation when it has one other than upright; an unreadable EXIF block
    says nothing of the pixels and leaves them as they are."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # Pillow's EXIF parser raises what its input makes it raise
        return image
    if orientation not in range(2, 9):
        return image
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)


def wide_pixels(image, fmt: str | None) -> np.ndarray | None:
    """A gray image of more than 8 bits as H x W float32 on the 0..255 scale, else None. Pillow converts such
    images to "L" by clipping at 255 (a 16-bit image turns almost white), so netdsl reads them itself:
    16-bit pixels scaled (65535 -> 255, as Pillow reads a 16-bit RGB file's high bytes; a PNG's 16-bit
    gray opens as "I" in older Pillows: `fmt` is the file's format), 32-bit integers and floats as they are,
    as an array's values are."""
    if image.mode.startswith("I;16") or (image.mode == "I" and fmt == "PNG"):
        return np.asarray(image, dtype=np.float32) * np.float32(PIXEL_RANGE / 65535)
    if image.mode in ("I", "F"):
        return np.asarray(image, dtype=np.float32)
    return None


def as_pixels(array: np.ndarray, channels: int, where: str | None = None) -> np.ndarray:
    """One image given as an array (H x W, H x W x C or C x H x W) as H x W x `channels`: uint8 stays
    uint8, any other number type becomes float32; gray becomes RGB and RGB gray as Pillow does it."""
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise NetError(
            f"an image of {array.dtype} values, not numbers",
            where=where,
            hint="save the images as numbers (uint8 pixels, or floats)",
        )
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3 and array.shape[2] not in (channels, 1, 3) and array.shape[0] in (channels, 1, 3):
        array = array.transpose(1, 2, 0)  # C x H x W; an array that fits both ways is read as H x W x C
    if array.ndim != 3 or array.shape[2] not in (channels, 1, 3):
        raise NetError(
            f"an image of shape {' x '.join(map(str, array.shape))} does not fit a {channels}-channel net",
            where=where,
            hint="give H x W, H x W x C or C x H x W",
        )
    if array.dtype != np.uint8:
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, which the first step reports
            array = array.astype(np.float32)
    return match_channels(array, channels, where)


def match_channels(pixels: np.ndarray, channels: int, where: str | None = None) -> np.ndarray:
    have = pixels.shape[2]
    if have == channels:
        return pixels
    if have == 1 and channels == 3:
        return np.repeat(pixels, 3, axis=2)
    if have == 3 and channels == 1:
        if pixels.dtype == np.uint8:  # Pillow's own conversion, so arrays and files agree to the bit
            return np.asarray(import_pillow().fromarray(pixels).convert("L"))[..., None]
        return (pixels @ np.asarray(LUMA, dtype=np.float32))[..., None]
    raise NetError(
        f"an image of {have} channels does not fit a {channels}-channel net",
        where=where,
        hint="give 1 (gray) or 3 (RGB) channels, or as many as the net's input has",
    )


def resized_shape(height: int, width: int, size: int | None, crop: tuple[int, int]) -> tuple[int, int]:
    """H, W after the shorter side is scaled to `size`, never smaller than the crop (as `netdsl run` does)."""
    if size is None:
        return height, width
    scale = size / min(height, width)
    shape = max(crop[0], round(height * scale)), max(crop[1], round(width * scale))
    if shape[0] * shape[1] > MAX_RESIZED_PIXELS:
        raise NetError(
            f"an image of {height} x {width}, its shorter side scaled to {size}, would be "
            f"{shape[0]:,} x {shape[1]:,} pixels",
            hint="crop it nearer to a square first",
        )
    return shape


def _resize(image, shape: tuple[int, int]):
    return image.resize((shape[1], shape[0]), import_pillow().Resampling.BILINEAR)


def resize_pixels(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """H x W x C pixels resized bilinearly by Pillow: 8-bit gray/RGB as Pillow images, anything else one
    float channel ("F") at a time, so values of any scale survive."""
    if pixels.shape[:2] == shape:
        return pixels
    pil = import_pillow()
    if pixels.dtype == np.uint8 and pixels.shape[2] in (1, 3):
        image = pil.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
        return _hwc(np.asarray(_resize(image, shape)))
    planes = [
        _resize(pil.fromarray(np.ascontiguousarray(pixels[..., c], dtype=np.float32)), shape)
        for c in range(pixels.shape[2])
    ]
    return np.stack([np.asarray(plane) for plane in planes], axis=2)


def _hwc(array: np.ndarray) -> np.ndarray:
    return array[..., None] if array.ndim == 2 else array


def crop_view(pixels: np.ndarray, top: int, left: int, crop: tuple[int, int], flip: bool) -> np.ndarray:
    view = pixels[top : top + crop[0], left : left + crop[1]]
    return view[:, ::-1] if flip else view


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one presentation of one sample: the same whatever process or worker draws it."""
    return np.random.default_rng([seed, epoch, index])


def principal_components(covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, never negative) and eigenvectors (columns, largest entry positive) of a
    symmetric covariance matrix."""
    values, vectors = np.linalg.eigh(np.asarray(covariance, dtype=np.float64))
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(len(values))])
    return values, vectors * np.where(signs == 0, 1.0, signs)


def _factor(rng: np.random.Generator, most: float) -> float:
    """A factor drawn uniformly from [1, most], inverted one time in two (Darknet's `rand_scale`)."""
    factor = float(rng.uniform(1.0, most))
    return factor if rng.random() < 0.5 else 1.0 / factor


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """... x 3 RGB values (0 and up) as hue (a share of the circle, [0, 1)), saturation ([0, 1]) and value (the
    largest of the three, on their scale): the hexcone model, as Python's colorsys computes one pixel."""
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    span = high - low
    with np.errstate(divide="ignore", invalid="ignore"):  # gray pixels (span 0) take hue 0, black saturation 0
        saturation = np.where(high > 0, span / high, 0.0)
        red, green, blue = ((high - rgb[..., channel]) / span for channel in range(3))
        hue = np.where(rgb[..., 1] == high, 2 + red - blue, 4 + green - red)
        hue = np.where(rgb[..., 0] == high, blue - green, hue)
    hue = np.where(span > 0, (hue / 6) % 1.0, 0.0)
    return np.stack([hue, saturation, high], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """`rgb_to_hsv`'s inverse: ... x 3 hue, saturation, value as RGB on the value's scale."""
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = np.floor(hue * 6.0)
    within = hue * 6.0 - sector
    p, q, t = value * (1 - saturation), value * (1 - saturation * within), value * (1 - saturation * (1 - within))
    sector = sector.astype(np.int64) % 6
    table = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    return np.stack([np.choose(sector, [row[channel] for row in table]) for channel in range(3)], axis=-1)


def jittered(pixels: np.ndarray, shift: float, saturation: float, exposure: float) -> np.ndarray:
    """H x W x C pixels (0..255) with Darknet's colour jitter: for RGB, the hue turned by `shift` of the circle,
    the saturation times `saturation` (at most 1) and the value times `exposure` (at most 255); a gray image's
    pixels times `exposure` (at most 255). float32."""
    values = pixels.astype(np.float64)
    if values.shape[-1] == 3:
        hsv = rgb_to_hsv(values)
        hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
        hsv[..., 1] = np.minimum(hsv[..., 1] * saturation, 1.0)
        hsv[..., 2] = np.minimum(hsv[..., 2] * exposure, PIXEL_RANGE)
        values = hsv_to_rgb(hsv)
    else:
        values = np.minimum(values * exposure, PIXEL_RANGE)
    return values.astype(np.float32)


def rotated_crop(
    pixels: np.ndarray, top: int, left: int, crop: tuple[int, int], degrees: float, fill: tuple[float, ...]
) -> np.ndarray:
    """The crop at (top, left) of H x W x C `pixels` turned `degrees` counter-clockwise about the image's centre
    (as Pillow's Image.rotate turns a picture), computed for the crop's pixels only: each takes the bilinear blend
    of the four pixels around the point it comes from, or `fill` (one value per channel) where that point lies
    outside the image. float32."""
    height, width = pixels.shape[:2]
    rows, columns = np.mgrid[top : top + crop[0], left : left + crop[1]].astype(np.float64)
    dy, dx = rows - (height - 1) / 2, columns - (width - 1) / 2
    theta = math.radians(degrees)
    y = (height - 1) / 2 + math.sin(theta) * dx + math.cos(theta) * dy  # the point each output pixel comes from
    x = (width - 1) / 2 + math.cos(theta) * dx - math.sin(theta) * dy
    edge = 1e-6  # a point on the border a rounding outside it (the corners of 90 and 180 degrees) is inside
    inside = (y >= -edge) & (y <= height - 1 + edge) & (x >= -edge) & (x <= width - 1 + edge)
    y0 = np.clip(np.floor(y), 0, max(height - 2, 0)).astype(np.int64)
    x0 = np.clip(np.floor(x), 0, max(width - 2, 0)).astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1)
    fy, fx = np.clip(y - y0, 0, 1)[..., None], np.clip(x - x0, 0, 1)[..., None]
    values = pixels.astype(np.float64)
    top_row = values[y0, x0] * (1 - fx) + values[y0, x1] * fx
    bottom_row = values[y1, x0] * (1 - fx) + values[y1, x1] * fx
    blended = top_row * (1 - fy) + bottom_row * fy
    filled = np.where(inside[..., None], blended, np.asarray(fill, dtype=np.float64))
    return filled.astype(np.float32)


@dataclass(frozen=True)
class Draw:
    """The random choices of one training presentation of one image."""

    top: int
    left: int
    flip: bool
    colour: np.ndarray | None  # added to every pixel (0..255 units), one value per channel
    jitter: tuple[float, float, float] | None = None  # (hue shift, saturation factor, exposure factor): `jittered`
    angle: float = 0.0  # degrees, counter-clockwise: the image turned about its centre before the crop


@dataclass(frozen=True)
class Augment:
    """The paper's training augmentation. PCA colour noise adds `255 * eigvecs @ (alpha * eigvals)` to every
    pixel, alpha ~ N(0, pca_noise) per component, drawn once per image per presentation; `eigvals`
    (descending) and `eigvecs` (its columns) are those of the training set's channel covariance of pixel
    values / 255, the scale of the paper's published ImageNet figures (see `DataSplit.augment`)."""

    flip: bool = True
    pca_noise: float = 0.1
    eigvals: tuple[float, ...] = ()
    eigvecs: tuple[tuple[float, ...], ...] = ()  # rows of the matrix whose columns are the eigenvectors
    random_crop: bool = True
    # VGG's scale jittering: each presentation scales the image's shorter side to a whole number drawn
    # uniformly from low to high (both included) before cropping; None: to the Preprocess's size
    sizes: tuple[int, int] | None = None
    # Inception's random-resized crops (Szegedy et al.): a box of a drawn share of the image's area and a drawn
    # aspect ratio (w / h, log-uniform), cut from the image as stored and scaled to the net's input;
    # None: crops of the scaled image (`draw`)
    area: tuple[float, float] | None = None
    aspect: tuple[float, float] = (3 / 4, 4 / 3)
    # Darknet's colour jitter (`jittered`): each presentation scales the saturation by a factor drawn uniformly
    # from [1, saturation] and then, one time in two, inverted; the exposure (the HSV value) likewise; and shifts
    # the hue by a share of the colour circle drawn uniformly from [-hue, hue]. 1, 1, 0: off
    saturation: float = 1.0
    exposure: float = 1.0
    hue: float = 0.0
    # Darknet's rotation: each presentation turns the scaled image about its centre by an angle drawn uniformly
    # from [-angle, angle] degrees (bilinear; where no pixel comes from, the mean colour) before the crop
    angle: float = 0.0

    def __post_init__(self) -> None:
        if not self.pca_noise >= 0:
            raise NetError(
                f"the colour noise's std must be at least 0, not {self.pca_noise}",
                where="pca_noise",
                hint="0 turns the colour noise off; the paper uses 0.1",
            )
        if self.pca_noise > 0 and not self.eigvals:
            raise NetError(
                "PCA colour noise needs the training set's colour eigenvalues",
                where="pca_noise",
                hint="take DataSplit.augment, or set pca_noise to 0",
            )
        if self.sizes is not None and not (len(self.sizes) == 2 and 1 <= self.sizes[0] < self.sizes[1]):
            raise NetError(
                f"the sizes to scale images to must be two whole numbers, low below high, not {self.sizes}",
                where="resize",
                hint="e.g. resize = (256, 512), as VGG's multi-scale training; one number for a fixed size",
            )
        if self.area is not None and not (len(self.area) == 2 and 0 < self.area[0] <= self.area[1] <= 1):
            raise NetError(
                f"the share of an image's area a crop takes must be two numbers in (0, 1], low first, not {self.area}",
                where="crop_area",
                hint="e.g. crop_area = (0.08, 1), Inception's and torchvision's RandomResizedCrop's",
            )
        if not (len(self.aspect) == 2 and 0 < self.aspect[0] <= self.aspect[1] < math.inf):
            raise NetError(
                f"the aspect ratios of the crops must be two numbers above 0, low first, not {self.aspect}",
                where="crop_aspect",
                hint="e.g. crop_aspect = (0.75, 1.333), width over height",
            )
        for name, value in (("saturation", self.saturation), ("exposure", self.exposure)):
            if not 1 <= value < math.inf:
                raise NetError(
                    f"the {name} factor's range must be at least 1, not {value}",
                    where=name,
                    hint=f"1 turns it off; {name} = 1.5 draws factors from 1/1.5 to 1.5 (Darknet's)",
                )
        if not 0 <= self.angle <= 180:
            raise NetError(
                f"the rotation's range must be from 0 to 180 degrees, not {self.angle}",
                where="angle",
                hint="0 turns it off; angle = 7 turns each image by up to 7 degrees either way",
            )
        if not 0 <= self.hue <= 0.5:
            raise NetError(
                f"the hue shift must be a share of the colour circle in [0, 0.5], not {self.hue}",
                where="hue",
                hint="0 turns it off; hue = 0.1 shifts by up to a tenth either way",
            )
        count = len(self.eigvals)
        if len(self.eigvecs) != count or any(len(row) != count for row in self.eigvecs):
            raise NetError(
                f"the colour eigenvectors must form a {count} x {count} matrix",
                where="eigvecs",
                hint="one eigenvector per colour channel, each as long as there are channels",
            )

    def box(self, rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
        """A random-resized crop's box of a height x width image: top, left, h, w. Up to ten tries draw a
        share of the area, uniform in `area`, and an aspect ratio, log-uniform in `aspect`, and keep the first
        box that fits; when none does, the largest centred box whose aspect is within the range
        (torchvision's RandomResizedCrop.get_params, with numpy's generator)."""
        low, high = np.log(self.aspect[0]), np.log(self.aspect[1])
        for _ in range(10):
            target = height * width * rng.uniform(self.area[0], self.area[1])
            ratio = math.exp(rng.uniform(low, high))
            sides = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if not all(side < 2 * max(height, width) for side in sides):  # far too long (or infinite): no fit
                continue
            w, h = round(sides[0]), round(sides[1])
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        if width / height < self.aspect[0]:
            w, h = width, min(height, max(1, round(width / self.aspect[0])))
        elif width / height > self.aspect[1]:
            h, w = height, min(width, max(1, round(height * self.aspect[1])))
        else:
            h, w = height, width
        return (height - h) // 2, (width - w) // 2, h, w

    def draw(self, rng: np.random.Generator, height: int, width: int, crop: tuple[int, int]) -> Draw:
        """Every choice is drawn, in a fixed order, whether or not it is used, so switching one kind of
        augmentation off leaves the others' draws as they were."""
        top = int(rng.integers(0, height - crop[0] + 1))
        left = int(rng.integers(0, width - crop[1] + 1))
        flip = bool(rng.random() < 0.5)
        with np.errstate(over="ignore", invalid="ignore"):  # a huge pca_noise: inf, which the first step reports
            alpha = rng.standard_normal(len(self.eigvals)) * self.pca_noise
        if not self.random_crop:
            top, left = (height - crop[0]) // 2, (width - crop[1]) // 2
        colour = None
        if self.pca_noise > 0:
            vectors, values = np.asarray(self.eigvecs), np.asarray(self.eigvals)
            with np.errstate(over="ignore", invalid="ignore"):
                colour = (PIXEL_RANGE * vectors @ (alpha * values)).astype(np.float32)
        shift = float(rng.uniform(-self.hue, self.hue))
        saturation, exposure = _factor(rng, self.saturation), _factor(rng, self.exposure)
        jitter = None if self.colour_settings() == () else (shift, saturation, exposure)
        angle = float(rng.uniform(-self.angle, self.angle))
        return Draw(top, left, flip and self.flip, colour, jitter, angle)

    def colour_settings(self) -> tuple[str, ...]:
        """The jitter settings that are on, of saturation, exposure and hue."""
        offs = {"saturation": 1.0, "exposure": 1.0, "hue": 0.0}
        return tuple(name for name, off in offs.items() if getattr(self, name) != off)

    def check_channels(self, channels: int, where=str) -> None:
        """NetError (on `where(setting)`) where saturation or hue, which change colours, are on for images of other
        than 3 channels (exposure changes a gray image's brightness)."""
        colourless = [name for name in self.colour_settings() if name != "exposure" and channels != 3]
        if colourless:
            raise NetError(
                f"`{colourless[0]}` changes colours, and the images have {channels} channel(s)",
                where=where(colourless[0]),
                hint=f"leave out {colourless[0]} for gray images; exposure changes them too",
            )


@dataclass
class Preprocess:
    """How a run prepared its images; saved with the weights (JSON in the safetensors metadata under
    "netdsl.preprocess") so `netdsl run` and `netdsl eval` prepare images the same way."""

    size: int | None  # the shorter side is scaled to this before cropping (None: the image is used as it is)
    crop: tuple[int, int]  # the net's input H, W
    channels: int  # the net's input channels: 1 (gray) or 3 (RGB) for image files
    mean: tuple[float, ...]  # per channel, of the training set, on its pixel values (0..255 for images)
    std: tuple[float, ...] | None = None  # per channel; None: pixels are not divided
    classes: list[str] = field(default_factory=list)
    flip: bool = True  # whether training flipped images (the ten test views mirror five only if it did)

    def check_fits(self, shape: tuple[int, ...], where: str) -> None:
        """NetError (blaming `where`, the weights file) when this is not the input of a net taking `shape`."""
        if (self.channels, *self.crop) != tuple(shape):
            raise NetError(
                f"the weights were trained on {self.channels} x {self.crop[0]} x {self.crop[1]} inputs, and "
                f"the net takes {' x '.join(map(str, shape))}",
                where=where,
                hint="give the weights trained for this net",
            )

    def pixels(self, image, largest: int | None = None) -> np.ndarray:
        """An image (a file path, a Pillow image or an array) converted to the net's channels and scaled:
        H x W x C, uint8 or float32. `largest`: a larger size training will scale it to (the top of a range
        of sizes), checked here against Pillow's bound on an image's pixels as `size` is."""
        return self._pixels(image, self.size, largest=largest)

    def _pixels(self, image, size: int | None, whole: bool = True, largest: int | None = None) -> np.ndarray:
        if isinstance(image, (str, Path)):
            image = open_image(Path(image), self.channels)
        if isinstance(image, np.ndarray):
            pixels = as_pixels(image, self.channels)
            if largest is not None:
                resized_shape(*pixels.shape[:2], largest, self.crop)
            pixels = resize_pixels(pixels, resized_shape(*pixels.shape[:2], size, self.crop))
        else:  # a Pillow image: resized as it is, without a round trip through numpy
            if largest is not None:
                resized_shape(image.height, image.width, largest, self.crop)
            mode = image_mode(self.channels)
            image = image if image.mode == mode else image.convert(mode)
            shape = resized_shape(image.height, image.width, size, self.crop)
            pixels = _hwc(np.asarray(image if (image.height, image.width) == shape else _resize(image, shape)))
        if whole and (pixels.shape[0] < self.crop[0] or pixels.shape[1] < self.crop[1]):
            raise NetError(
                f"an image of {pixels.shape[0]} x {pixels.shape[1]} is smaller than the net's input "
                f"{self.crop[0]} x {self.crop[1]}",
                hint="give a size to scale images to",
            )
        return pixels

    def normalize(
        self, view: np.ndarray, colour: np.ndarray | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """An H x W x C crop plus a colour offset, less the mean, over the std: C x H x W float32, written
        into `out` when given (one pass over the pixels)."""
        shift = np.asarray(self.mean, dtype=np.float64) - (0.0 if colour is None else colour)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite pixels stay so; the first step reports them
            values = np.subtract(
                view.transpose(2, 0, 1), shift.astype(np.float32)[:, None, None], out=out, dtype=np.float32, order="C"
            )
        if self.std is not None:
            np.divide(values, np.asarray(self.std, dtype=np.float32)[:, None, None], out=values)
        return values

    def apply(self, image, out: np.ndarray | None = None) -> np.ndarray:
        """The centre view, C x H x W float32: what `netdsl run` and `netdsl eval` feed the net."""
        pixels = self.pixels(image)
        top, left = (pixels.shape[0] - self.crop[0]) // 2, (pixels.shape[1] - self.crop[1]) // 2
        return self.normalize(crop_view(pixels, top, left, self.crop, False), out=out)

    def views(self, image, count: int) -> np.ndarray:
        """count x C x H x W: 1, the centre; 10, the paper's test views: the centre, top-left, top-right,
        bottom-left and bottom-right crops, then the same five flipped (or, for a net trained without flips,
        unflipped again: mirror images it never learned would only blur its scores)."""
        if count not in VIEW_COUNTS:
            raise NetError(f"{count} views: netdsl takes 1 or 10", where="--views", hint="--views 1 or --views 10")
        pixels = self.pixels(image)
        bottom, right = pixels.shape[0] - self.crop[0], pixels.shape[1] - self.crop[1]
        places = [(bottom // 2, right // 2)]
        if count == 10:
            places += [(0, 0), (0, right), (bottom, 0), (bottom, right)]
        flips = (False, self.flip) if count == 10 else (False,)
        return np.stack(
            [self.normalize(crop_view(pixels, top, left, self.crop, flip)) for flip in flips for top, left in places]
        )

    def augmented(self, image, augment: Augment, rng: np.random.Generator, out: np.ndarray | None = None) -> np.ndarray:
        """One training presentation: scaled (to a drawn size, with `augment.sizes`), a crop, maybe flipped,
        with colour noise; C x H x W float32."""
        if augment.area is not None:  # a box of the image as stored, scaled to the net's input (any size will do)
            pixels = self._pixels(image, None, whole=False)
            top, left, height, width = augment.box(rng, *pixels.shape[:2])
            pixels = resize_pixels(pixels[top : top + height, left : left + width], self.crop)
        else:
            size = self.size if augment.sizes is None else int(rng.integers(augment.sizes[0], augment.sizes[1] + 1))
            pixels = self._pixels(image, size)
        draw = augment.draw(rng, pixels.shape[0], pixels.shape[1], self.crop)
        if draw.angle:
            pixels = rotated_crop(pixels, draw.top, draw.left, self.crop, draw.angle, self.mean)
            draw = replace(draw, top=0, left=0)  # the crop is cut already
        view = crop_view(pixels, draw.top, draw.left, self.crop, draw.flip)
        if draw.jitter is not None:
            view = jittered(view, *draw.jitter)
        return self.normalize(view, draw.colour, out)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": PREPROCESS_FORMAT,
                "size": self.size,
                "crop": list(self.crop),
                "channels": self.channels,
                "mean": list(self.mean),
                "std": None if self.std is None else list(self.std),
                "classes": list(self.classes),
                "flip": self.flip,
            }
        )

    @classmethod
    def from_json(cls, text: str, where: str | None = None) -> Preprocess:
        """The record `to_json` wrote; a NetError blaming `where` (the weights file) when it is damaged."""
        try:
            data = parse_json(text)
            if data.get("format") != PREPROCESS_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {PREPROCESS_FORMAT}")
            channels = int(data["channels"])
            mean = tuple(float(v) for v in data["mean"])
            std = None if data["std"] is None else tuple(float(v) for v in data["std"])
            crop = tuple(int(v) for v in data["crop"])
            size = None if data["size"] is None else int(data["size"])
            classes = [str(name) for name in data["classes"]]
            flip = data.get("flip", True)  # records before it was kept: the paper's flips
            if not isinstance(flip, bool):
                raise ValueError(f"flip {flip!r} is not true or false")
            if len(crop) != 2 or len(mean) != channels or (std is not None and len(std) != channels):
                raise ValueError("crop, channels, mean and std do not fit together")
            if channels < 1 or min(crop) < 1 or (size is not None and not 1 <= size <= MAX_SIZE):
                raise ValueError(f"channels {channels}, crop {crop} or size {size} out of range")
            if not all(math.isfinite(v) for v in mean) or (std is not None and not all(0 < v < math.inf for v in std)):
                raise ValueError("a mean that is not a number, or a std that is not above 0")
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise NetError(
                f"the saved preprocessing is damaged ({error})",
                where=where,
                hint="save the weights again with `netdsl train`, which writes this record",
            ) from None
        return cls(size=size, crop=crop, channels=channels, mean=mean, std=std, classes=classes, flip=flip)
