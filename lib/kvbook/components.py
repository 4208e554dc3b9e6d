"""Entry point kept for scripts that call `python -m kvbook.components ...` (the set-up checklist does):
the commands live in kvbook.ops.components."""

if __name__ == "__main__":
    import sys

    from kvbook.ops.components import main

    sys.exit(main())
