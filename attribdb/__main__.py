"""`python -m attribdb` is the `attribdb` command (torchrun runs it this way)."""

from attribdb.cli import main

if __name__ == "__main__":
    main()
