"""`python -m crashlab`: the same as the `crashlab` command."""

from crashlab.cli import main

main()
