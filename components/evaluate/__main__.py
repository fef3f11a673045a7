"""``python -m linear_moe.components.evaluate --help``."""
if __name__ == "__main__":
    from linear_moe.components.evaluate.cli import main

    raise SystemExit(main())
