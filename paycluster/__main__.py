"""`python -m paycluster`: the same as the `paycluster` console script."""

from paycluster.cli import main

main()
