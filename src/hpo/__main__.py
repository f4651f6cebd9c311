"""`python -m hpo`: the same commands as `hpo`."""

from hpo.cli import main

main()
