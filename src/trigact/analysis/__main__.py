"""``python -m trigact.analysis``: the entry point; its body is :mod:`trigact.cli.analysis`."""

from trigact.cli.analysis import main

if __name__ == "__main__":
    main()
