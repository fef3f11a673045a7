"""``python -m linear_moe.components.tokenize --help``."""
if __name__ == "__main__":  # guard: spawned workers re-import this module as __mp_main__
    from linear_moe.components.tokenize.cli import main

    raise SystemExit(main())
