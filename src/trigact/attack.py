"""``python -m trigact.attack``: the entry point; its body is :mod:`trigact.cli.attack`."""

from trigact.cli.attack import main

if __name__ == "__main__":
    main()
