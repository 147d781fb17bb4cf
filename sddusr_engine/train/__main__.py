"""`python -m sddusr_engine.train`: run the training loop's command line."""

from .loop import main

main()
