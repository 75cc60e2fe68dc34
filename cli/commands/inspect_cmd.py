"""`peftx inspect MODEL --method M`: adapted layers and parameter counts."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import handle_errors
from ..options import Alpha, Init, Json, Method, MethodOption, Rank, Targets
from ..output import console, key_values, print_json, table


@handle_errors
def inspect(
    model: Annotated[
        str, typer.Argument(help="timm model name, e.g. vit_base_patch16_224 or swin_tiny_patch4_window7_224.")
    ],
    method: Method = "rlrr",
    num_classes: Annotated[int, typer.Option("--num-classes", "-c", min=1, help="Classes of the new head.")] = 10,
    img_size: Annotated[int | None, typer.Option("--img-size", help="Input size.", show_default="the model's")] = None,
    rank: Rank = None,
    alpha: Alpha = None,
    targets: Targets = None,
    init: Init = None,
    method_option: MethodOption = None,
    json_out: Json = False,
) -> None:
    """Show which layers an adapter method wraps and how many parameters it trains."""
    from peftx.methods import options_from_cli
    from peftx.summary import inspect_model

    options = options_from_cli(
        method, {"rank": rank, "alpha": alpha, "targets": targets, "init": init}, method_option or ()
    )
    info = inspect_model(model, method, num_classes=num_classes, img_size=img_size, options=options)
    if json_out:
        print_json(info)
        return
    layers = info["adapted_layers"]
    console.print(
        table(
            f"{len(layers)} adapted layers",
            ["layer", "kind", "params"],
            ([r["name"], r["kind"], f"{r['params']:,}"] for r in layers),
            right=(2,),
        )
    )
    console.print(
        key_values(
            f"{model} + {method}",
            {
                "trainable_params": info["trainable_params"],
                "  adapter": info["adapter_params"],
                "  head": info["head_params"],
                "total_params": info["total_params"],
                "trainable fraction": f"{100 * info['trainable_fraction']:.3f} %",
            },
        )
    )
    for note in info["notes"]:  # what the method left out here because it would not merge exactly
        console.print(f"note: {note}")
