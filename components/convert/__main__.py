"""``python -m linear_moe.components.convert --help``."""
if __name__ == "__main__":  # guard: dist_checkpointing spawns helper processes that re-import __main__
    from linear_moe.components.convert.cli import main

    raise SystemExit(main())
