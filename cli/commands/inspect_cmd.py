"""`peftx inspect MODEL --method M`: adapted layers and parameter counts."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import handle_errors
from ..options import Json, Method
from ..output import console, key_values, print_json, table


@handle_errors
def inspect(
    model: Annotated[str, typer.Argument(help="timm model name, e.g. vit_base_patch16_224 or swin_tiny_patch4_window7_224.")],
    method: Method = "rlrr",
    num_classes: Annotated[int, typer.Option("--num-classes", "-c", min=1, help="Classes of the new head.")] = 10,
    img_size: Annotated[Optional[int], typer.Option("--img-size", help="Input size (default: the model's).")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", "-r", help="Rank (LoRA r / AOFT d).")] = None,
    json_out: Json = False,
) -> None:
    """Show which layers an adapter method wraps and how many parameters it trains."""
    from peftx.summary import inspect_model

    options = {} if rank is None else ({"r": rank} if method == "lora" else {"rank": rank})
    info = inspect_model(model, method, num_classes=num_classes, img_size=img_size, options=options)
    if json_out:
        print_json(info)
        return
    layers = info["adapted_layers"]
    console.print(table(f"{len(layers)} adapted layers", ["layer", "kind", "params"],
                        ([r["name"], r["kind"], f"{r['params']:,}"] for r in layers)))
    console.print(key_values(f"{model} + {method}", {
        "trainable_params": info["trainable_params"], "  adapter": info["adapter_params"],
        "  head": info["head_params"], "total_params": info["total_params"],
        "trainable fraction": f"{100 * info['trainable_fraction']:.3f} %"}))
