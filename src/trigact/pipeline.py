"""``python -m trigact.pipeline``: the entry point; its body is :mod:`trigact.cli.pipeline`."""

from trigact.cli.pipeline import main

if __name__ == "__main__":
    main()
