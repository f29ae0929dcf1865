"""`python -m selfplay ...` (and `torchrun ... -m selfplay run ...`): the `selfplay` command."""

from selfplay.cli import main

main()
