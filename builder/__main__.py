"""`python -m builder`: the mapbuild command line, for launchers that take a module (torchrun -m, accelerate -m)."""

from .cli import cli

cli()
