"""``python -m trigact.detect``: the entry point; its body is :mod:`trigact.cli.detect`."""

from trigact.cli.detect import main

if __name__ == "__main__":
    main()
