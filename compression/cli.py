"""Subcommands of the compression package (filled in by compression/)."""


def add_subcommands(sub) -> None:
    pass
