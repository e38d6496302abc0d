"""``python -m prsgd COMMAND ...``: the ``prsgd`` command (:mod:`prsgd.cli`)."""

from prsgd.cli import main

if __name__ == "__main__":  # not when a spawned process (prsgd predict's calibration) imports it
    main()
