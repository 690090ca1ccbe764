"""``python -m trigact.evaluate``: the entry point; its body is :mod:`trigact.cli.evaluate`."""

from trigact.cli.evaluate import main

if __name__ == "__main__":
    main()
