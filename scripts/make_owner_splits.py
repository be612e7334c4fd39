"""Split the digits among data owners, each a CSV of its own, for federated examples and benchmarks.

IID (every owner a uniform random part) or non-identical: each class's rows divided among the
owners by Dirichlet(alpha) proportions (alpha 0.3: most owners see only a few classes).

    python scripts/make_owner_splits.py --owners 2 --out examples/data/owners
    python scripts/make_owner_splits.py --owners 4 --dirichlet 0.3 --out /tmp/noniid
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "examples" / "data" / "owners"


def owner_parts(labels: np.ndarray, owners: int, dirichlet: float | None, seed: int = 0) -> list[np.ndarray]:
    """Row indices of each owner: IID, or per class by Dirichlet(``dirichlet``) proportions (pure)."""
    rng = np.random.default_rng(seed)
    if dirichlet is None:
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), owners)]
    parts: list[list[int]] = [[] for _ in range(owners)]
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet([dirichlet] * owners)) * len(rows)).astype(int)[:-1]
        for owner, chunk in enumerate(np.split(rows, cuts)):
            parts[owner].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=int)) for p in parts]


def write_owner_splits(out: Path, owners: int, dirichlet: float | None = None, seed: int = 0) -> list[Path]:
    """``out/owner<i>.csv`` per owner (the digits' header: pixel_0..pixel_63,label); returns the paths."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, rows in enumerate(owner_parts(digits.target, owners, dirichlet, seed)):
        path = out / f"owner{i}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow([f"pixel_{j}" for j in range(digits.data.shape[1])] + ["label"])
            for r in rows:
                writer.writerow([*digits.data[r].astype(int).tolist(), int(digits.target[r])])
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owners", type=int, default=2)
    parser.add_argument("--dirichlet", type=float, default=None, help="alpha of the label skew (default: IID)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for path in write_owner_splits(args.out, args.owners, args.dirichlet, args.seed):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
