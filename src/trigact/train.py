"""``python -m trigact.train``: the entry point; its body is :mod:`trigact.cli.train`."""

from trigact.cli.train import main

if __name__ == "__main__":
    main()
