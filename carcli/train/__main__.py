"""`python -m carcli.train train|export ...` (the same commands as `car train`/`car export`)."""

import typer

from carcli.train.commands import export, train

app = typer.Typer(add_completion=False, no_args_is_help=True)
app.command()(train)
app.command()(export)

if __name__ == "__main__":
    app()
