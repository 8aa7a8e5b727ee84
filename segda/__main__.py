"""`python -m segda ...` (and so `accelerate launch -m segda ...`) runs the CLI."""

from segda.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
