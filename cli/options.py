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

# The bundle options every exporting command shares (`merge-export` declares its own copies of the first four).
Batch = Annotated[str, typer.Option("--batch", help="Dynamic batch profile MIN:OPT:MAX.")]
Precision = Annotated[str, typer.Option("--precision", help="fp32 or fp16 (the TensorRT engine; the FP16 ONNX is always checked).")]
TensorRT = Annotated[str, typer.Option("--tensorrt", help="auto: build an engine when TensorRT and a GPU exist; on: require it; off: skip (and tolerate readiness problems).")]
Images = Annotated[Optional[Path], typer.Option("--images", help="Directory of real images for the parity check (default: the run's validation images, else shipped photos).", show_default=False)]
NoSimplify = Annotated[bool, typer.Option("--no-simplify", help="Skip the onnxslim pass.")]
ImgSize = Annotated[Optional[int], typer.Option("--img-size", min=1, help="Image size the model was fine-tuned at (default: the timm model's).", show_default=False)]
