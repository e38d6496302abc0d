"""``python -m prsgd.train``: one training run from flags (kept at this path; the code is
:mod:`prsgd.training.train`)."""

from prsgd.training.train import main, preflight, run

__all__ = ["main", "preflight", "run"]

if __name__ == "__main__":
    main()
