"""The embedded database's process: SecantusDB's own command line, named ``bookshop database`` in ``ps``.

``secantusd-py`` is a console script, which ``ps`` would show as one more ``python`` line; started as
``python -m bookshop.database_process ARGS`` it names itself first. Nothing here runs in the shop's own
processes.
"""

if __name__ == "__main__":
    import sys

    from secantus.cli import main

    from bookshop.procs import DATABASE_TITLE, set_title

    set_title(DATABASE_TITLE)
    sys.exit(main(sys.argv[1:]))
