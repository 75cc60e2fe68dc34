"""Option aliases shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

# readable=False: peftx checks readability itself (a one-line WeightsError) instead of Click's multi-line usage error.
Weights = Annotated[Optional[Path], typer.Option("--weights", "-w", help="Local backbone weights (.safetensors, or a torch file of tensors, loaded with weights_only).", show_default=False, readable=False)]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output (never done without it).")]
Method = Annotated[str, typer.Option("--method", "-m", help="Adapter method: rlrr, aoft or lora.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
Target = Annotated[Optional[str], typer.Option("--target", "-t", help="Deployment target: trt8.5, trt8.6, trt10, trt11, jetpack5, jetpack6.0, jetpack6, jetpack7 or auto (the installed TensorRT's); see `peftx targets` [default: trt8.6].", show_default=False)]
