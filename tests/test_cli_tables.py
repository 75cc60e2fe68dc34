"""The CLI's tables as a terminal of 80 and 100 columns shows them: nothing cut off with "…", no line wider than the
terminal, no raw floats (the training / eval / bench / bundle tables are checked where those commands are tested:
test_train_cli.py, test_bench.py, test_deploy.py)."""

from __future__ import annotations

import pytest
from cli_render import assert_fits
from typer.testing import CliRunner

from peftx.cli import output
from peftx.cli.app import app


@pytest.mark.parametrize("width", [80, 100])
@pytest.mark.parametrize(
    "argv",
    [
        ["targets"],
        ["doctor"],
        ["inspect", "vit_tiny_patch16_224", "--img-size", "32"],
        ["inspect", "swin_tiny_patch4_window7_224", "--method", "lora", "--img-size", "64"],
    ],
    ids=["targets", "doctor", "inspect-vit", "inspect-swin"],
)
def test_command_tables_fit(argv: list[str], width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output.console, "width", width)
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.stderr
    assert_fits(res.stdout, width)


def test_numbers_are_rounded_for_people() -> None:
    from peftx.cli.output import duration, number, percent

    assert number(22.28850870999986) == "22.29" and number(0.000123456) == "1.23e-04" and number(1234567) == "1,234,567"
    assert number(None) == "—" and number(True) == "True" and number(3.0) == "3"
    assert percent(0.97777) == "97.78 %" and percent(None) == "—"
    assert duration(22.3) == "22 s" and duration(1117) == "19 min" and duration(7200) == "2.0 h"


def test_markup_in_data_is_printed_as_written() -> None:
    """A class or a path with [brackets] is data, not rich markup."""
    from cli_render import render

    text = render(output.table("per class (test)", ["class"], [["[cat]"], ["[bold]dog[/bold]"]]), 80)
    assert "[cat]" in text and "[bold]dog[/bold]" in text
    text = render(output.key_values("run [test]", {"path": "/data/[x]/y"}), 80)
    assert "run [test]" in text and "/data/[x]/y" in text


@pytest.mark.parametrize("width", [80, 100])
def test_the_parity_table_fits_with_every_kind_of_row(width: int) -> None:
    """merge-export / validate's parity table: a passing, a failing and an advisory candidate, a long name."""
    import numpy as np
    import torch
    from cli_render import assert_renders

    from peftx.exports.parity import compare, make_input_sets, parity_table
    from peftx.exports.runners import TorchRunner
    from peftx.tolerances import FP16, ONNX_FP32

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)).eval()
    moved = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)).eval()
    moved.load_state_dict(model.state_dict())
    with torch.no_grad():
        moved[1].bias += 0.5  # far outside FP32's bound: FAIL when required, "fail (advisory)" when not
    inputs = make_input_sets(np.random.default_rng(0).standard_normal((4, 3, 2, 2)), [1, 3, 8])
    reference = TorchRunner(model, name="unmerged")
    results = [
        compare(reference, TorchRunner(model, name="onnxruntime fp32"), inputs, ONNX_FP32),
        compare(reference, TorchRunner(moved, name="fp16 emulation (strict rounding)"), inputs, ONNX_FP32),
        compare(reference, TorchRunner(moved, name="onnxruntime int8"), inputs, FP16, required=False),
    ]
    assert [r.overall.passed for r in results] == [True, False, False]
    text = assert_renders(parity_table(results), width, ["onnxruntime fp32", "onnxruntime int8"])
    assert "FAIL" in text and "fail (advisory)" in text and text.count("pass") == 1


@pytest.mark.parametrize("width", [80, 100])
def test_a_failing_row_names_the_input_set_that_failed_and_by_how_much(width: int) -> None:
    """The issue's case: an advisory candidate off only on the small-scale random set. Over all sets its max |Δ|
    sits below the overall bound; the row must show the failing set, its own figures and the excess."""
    import numpy as np
    import torch
    from cli_render import assert_renders

    from peftx.exports.parity import compare, make_input_sets, parity_table
    from peftx.exports.runners import TorchRunner
    from peftx.tolerances import FP16

    class OffOnRandom(TorchRunner):
        def infer(self, batch: np.ndarray) -> np.ndarray:
            out = super().infer(batch)
            return out + (0.05 if len(batch) == 3 else 0.0)  # random_b3 only

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)).eval()
    images = 40 * np.random.default_rng(0).standard_normal((4, 3, 2, 2))  # real sets: outputs 10x the random set's
    inputs = make_input_sets(images, [1, 8])
    result = compare(TorchRunner(model), OffOnRandom(model, name="onnxruntime int8"), inputs, FP16, required=False)
    s, bad = result.overall, result.sets["random_b3"]
    assert not result.passed and not bad.passed and all(v.passed for k, v in result.sets.items() if k != "random_b3")
    assert s.max_abs < s.bound  # what the old row showed: an error below its bound, marked failed
    text = assert_renders(parity_table([result]), width, ["onnxruntime int8"])
    assert "fail (advisory)" in text and "random_b3" in text and f"{bad.bound:.1e}" in text  # the set's own bound
    if width >= 100:
        assert f"└ random_b3: |Δ| {bad.max_abs / bad.bound:.1f}x its bound" in text
