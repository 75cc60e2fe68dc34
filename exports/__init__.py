"""Export backends: ONNX, FP16 emulation, TensorRT, deployment bundle and parity checks (installed as ``peftx.exports``)."""
