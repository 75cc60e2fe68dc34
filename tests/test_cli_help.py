"""`--help` of every command, as a new user reads it: complete (every option with a value shows its default, the
default backbone named in full), nothing cut off at 80 or 100 columns, no stray " ." where markup used to be, and
`peftx --version`."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from peftx import __version__
from peftx.backbones import DEMO_MODEL
from peftx.cli.app import app

GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)  # type: ignore[attr-defined]


def _help(argv: list[str], columns: int) -> str:
    res = CliRunner().invoke(app, [*argv, "--help"], env={"COLUMNS": str(columns)})
    assert res.exit_code == 0, res.output
    return res.stdout


@pytest.mark.parametrize("columns", [80, 100])
@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_fits_and_has_no_cut_or_stray_text(command: str | None, columns: int) -> None:
    text = _help([command] if command else [], columns)
    assert "…" not in text
    assert not [line for line in text.splitlines()[1:] if line.rstrip().endswith("...")], text  # click cuts with ...
    assert max(len(line) for line in text.splitlines()) <= columns, text
    assert not re.search(r"\s\.(\s|$)", text), f"a stray ' .' in:\n{text}"
    assert "[default: ]" not in text and "[default: ()]" not in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_that_takes_a_value_shows_its_default(command: str) -> None:
    cmd = GROUP.commands[command]  # type: ignore[attr-defined]
    ctx = cmd.make_context(command, [], resilient_parsing=True)
    missing = []
    for param in cmd.params:
        if getattr(param, "hidden", False) or param.param_type_name != "option" or param.name == "help":
            continue
        if param.is_flag and not param.secondary_opts:  # a plain switch (--json, --force): off unless given
            continue
        if param.required:  # no default to show: the help says [required]
            continue
        record = param.get_help_record(ctx)
        if record is None or "[default:" not in record[1]:
            missing.append("/".join(param.opts))
    assert not missing, f"peftx {command}: options without a shown default: {missing}"


def test_the_default_backbone_is_named_in_full() -> None:
    from peftx.cli.commands.train_cmd import DEFAULT_MODEL

    assert DEFAULT_MODEL == DEMO_MODEL
    for columns in (80, 100):
        assert DEMO_MODEL in _help(["train"], columns)


def test_hidden_aliases_are_hidden_but_accepted() -> None:
    """One spelling per idea (--force, --time-bundle); the old spellings still parse and are not advertised."""
    for command, alias, main in (
        ("train", "--overwrite", "--force"),
        ("merge-export", "--overwrite", "--force"),
        ("bench", "--bundle", "--time-bundle"),
    ):
        text = _help([command], 100)
        assert main in text and alias not in text.replace(main, "")
        cmd = GROUP.commands[command]  # type: ignore[attr-defined]
        assert any(alias in p.opts and p.hidden for p in cmd.params)


def test_help_values_are_read_from_the_recipes_and_targets() -> None:
    """The defaults `--help` shows for training options and the target list are derived from peftx.train.recipes and
    exports/targets.py, so a changed recipe or a new target shows up in the help without editing it."""
    from peftx.cli.options import recipe_default
    from peftx.exports.targets import DEFAULT_TARGET, target_names
    from peftx.train.recipes import DEMO, GENERIC, VTAB_1K

    train = {p.name: p for p in GROUP.commands["train"].params}  # type: ignore[attr-defined]
    for field in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "min_lr", "dropout", "img_size"):
        assert train[field].show_default == recipe_default(field), field
    assert train["hflip"].show_default == recipe_default("hflip")
    vtab_epochs = {r.epochs for r in VTAB_1K.values()}
    assert len(vtab_epochs) == 1
    assert (
        recipe_default("epochs")
        == f"the recipe's: demo {DEMO.epochs}, own data {GENERIC.epochs}, VTAB {vtab_epochs.pop()}"
    )
    assert recipe_default("lr").endswith("VTAB per task")  # the paper's lr differs per task
    target = next(p for p in GROUP.commands["merge-export"].params if p.name == "target")  # type: ignore[attr-defined]
    assert target.show_default == DEFAULT_TARGET
    assert all(name in target.help for name in target_names())


def test_version() -> None:
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"peftx {__version__}"
