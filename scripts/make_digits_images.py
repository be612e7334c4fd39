"""Write scikit-learn's handwritten digits as an image folder: ``<out>/<digit>/<index>.png``.

The data ships with scikit-learn, so this needs no network. The images are generated, not committed:

    python scripts/make_digits_images.py              # -> examples/data/digits-images/0..9/*.png
    python scripts/make_digits_images.py --out /tmp/digits-images

Each 8x8 image becomes an 8-bit grayscale PNG (scikit-learn's 0..16 intensities scaled to 0..255),
the layout a job reads with ``data: {format: image_folder, image_size: [8, 8], grayscale: true}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "examples" / "data" / "digits-images"


def write_digits_images(out: Path) -> int:
    """Write one PNG per digit under ``out/<label>/``; returns the image count."""
    import numpy as np  # imported here: the script's --help should be instant
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        folder = out / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:04d}.png")  # 2-D uint8: 8-bit grayscale ("L")
    return len(digits.target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    images = write_digits_images(args.out)
    print(f"wrote {images} images to {args.out}")


if __name__ == "__main__":
    main()
