"""Typed exceptions raised by the library.

Every error carries a one-line ``message`` (what is wrong) and a ``hint`` (what to do). The CLI turns them into a
single line on stderr and a non-zero exit code; the library never prints or exits.
"""

from __future__ import annotations


class PeftxError(Exception):
    """Base class: ``message`` says what is wrong, ``hint`` what to do about it."""

    exit_code = 1
    default_hint = ""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(PeftxError):
    """Conflicting or invalid options / hyper-parameters."""

    exit_code = 2


class UnknownModelError(PeftxError):
    """The model name is not a timm model."""

    exit_code = 2
    default_hint = "list candidates with `python -c \"import timm; print(timm.list_models('vit_*'))\"`"


class UnsupportedModelError(PeftxError):
    """The model (or one of its layers) is not one peftx knows how to adapt."""

    exit_code = 2
    default_hint = (
        "peftx supports timm VisionTransformer (ViT, DeiT, DINOv2, CLIP, SigLIP), Eva (EVA-02, DINOv3, PE, RoPE ViT), "
        "Beit, SwinTransformer and SwinTransformerV2 models (docs/backbones.md)"
    )


class WeightsError(PeftxError):
    """Backbone weights are missing, unreadable, or do not fit the model."""

    exit_code = 3
    default_hint = "pass a local weights file with --weights FILE (.safetensors, or a torch file of tensors)"


class AdapterFileError(PeftxError):
    """An adapter / checkpoint file is missing, corrupt, or has the wrong tensors."""

    exit_code = 3


class AdapterMismatchError(PeftxError):
    """An adapter was trained for another backbone, class count or method."""

    exit_code = 3
    default_hint = "load the adapter onto the backbone it was trained on (see its adapter_config.json)"


class NonFiniteError(PeftxError):
    """A tensor holds NaN or Inf; nothing was changed."""

    exit_code = 3


class DataError(PeftxError):
    """A dataset is missing, empty, unbalanced, or holds unreadable files."""

    exit_code = 4


class OutputError(PeftxError):
    """An output path exists, is not writable, or the disk is full."""

    exit_code = 5


class ExportError(PeftxError):
    """ONNX / TensorRT export failed or produced an unusable artifact."""

    exit_code = 6


class ParityError(PeftxError):
    """An exported artifact disagrees with the unmerged PyTorch model beyond tolerance."""

    exit_code = 7


class BackendUnavailableError(PeftxError):
    """An optional backend (TensorRT, CUDA) was required but is not installed / present."""

    exit_code = 8


class CheckFailedError(PeftxError):
    """A check run (``peftx gpu-check``) completed, and at least one of its checks failed; its report says which."""

    exit_code = 9


class TrainingInterrupted(PeftxError):
    """SIGINT / SIGTERM arrived: the current step finished and a resumable checkpoint was written."""

    exit_code = 130
