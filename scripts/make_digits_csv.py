"""Write scikit-learn's handwritten digits (8x8 images, 10 classes) to a CSV for the examples.

The data ships with scikit-learn, so this needs no network. The CSV is generated, not committed:

    python scripts/make_digits_csv.py                # -> examples/data/digits.csv
    python scripts/make_digits_csv.py --out /tmp/digits.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "examples" / "data" / "digits.csv"


def write_digits_csv(out: Path) -> int:
    """Write the digits to ``out`` (header ``pixel_0..pixel_63,label``, integers); returns the row count."""
    from sklearn.datasets import load_digits  # imported here: the script's --help should be instant

    digits = load_digits()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([f"pixel_{i}" for i in range(digits.data.shape[1])] + ["label"])
        for pixels, label in zip(digits.data.astype(int), digits.target.astype(int)):
            writer.writerow([*pixels.tolist(), int(label)])
    return len(digits.target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output CSV (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    rows = write_digits_csv(args.out)
    print(f"wrote {rows} rows to {args.out}")


if __name__ == "__main__":
    main()
