"""`python -m hfrecipes` is the CLI, so `accelerate launch -m hfrecipes pretrain --config ...` works."""

from hfrecipes.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
