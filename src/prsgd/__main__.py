"""``python -m prsgd COMMAND ...``: the ``prsgd`` command (:mod:`prsgd.cli`)."""

from prsgd.cli import main

main()
