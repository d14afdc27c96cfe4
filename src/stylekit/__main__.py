"""`python -m stylekit …` (and `accelerate launch -m stylekit distill …`) runs the CLI."""

from stylekit.cli import main

main()
