"""Write scikit-learn's diabetes data (442 patients, 10 features, a disease-progression target) to a CSV.

The data ships with scikit-learn, so this needs no network. The CSV is generated, not committed:

    python scripts/make_diabetes_csv.py              # -> examples/data/diabetes.csv
    python scripts/make_diabetes_csv.py --out /tmp/diabetes.csv

Columns: age, sex, bmi, bp, s1..s6 (blood serum measurements) in their original units, unscaled
(the models normalise their own inputs), and ``progression``, a measure of the disease one year on.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "examples" / "data" / "diabetes.csv"
TARGET = "progression"


def write_diabetes_csv(out: Path) -> int:
    """Write the diabetes rows to ``out`` (header: the 10 feature names, then ``progression``); returns the row count."""
    from sklearn.datasets import load_diabetes  # imported here: the script's --help should be instant

    diabetes = load_diabetes(scaled=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*diabetes.feature_names, TARGET])
        for features, target in zip(diabetes.data.tolist(), diabetes.target.tolist()):
            writer.writerow([*(f"{v:g}" for v in features), f"{target:g}"])
    return len(diabetes.target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output CSV (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    rows = write_diabetes_csv(args.out)
    print(f"wrote {rows} rows to {args.out}")


if __name__ == "__main__":
    main()
