"""ONNX files past protobuf's 2 GB: the one place that loads, saves and lists the files of an ONNX model.

A protobuf message cannot pass 2 GiB, so a model whose weights do (ViT-H/14 in FP32 is 2.5 GB, DINOv3 ViT-7B far
more) is stored as a graph file plus ONE external-data file beside it: ``model.onnx`` + ``model.onnx.data``. Each
initialiser records its file (a path relative to the graph's directory), offset and length; ONNX Runtime, onnx's
checker, TensorRT's ONNX parser (trtexec, Polygraphy) and DeepStream's nvinfer all follow that reference, so the
pair only has to travel together. Every step that writes an ONNX file saves through :func:`save`, which picks the
form from the model's size; every step that only reads the graph (op histograms, Q/DQ placement, readiness, shape
inference) loads it with :func:`load` ``weights=False``, which never reads the weights.

Below the limit a model is one file, exactly as before. The limit is a module value (``EXTERNAL_DATA_MIN_BYTES``) so
that tests can lower it and run the external-data path end to end on tiny models.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import external_data_helper

from peftx.errors import ExportError

# protobuf's limit is 2 GiB - 1 byte (onnx.checker.MAXIMUM_PROTOBUF); saving inline needs the whole message
# serialised at once, so the switch happens 64 MiB before it (metadata and graph edits made later must still fit).
EXTERNAL_DATA_MIN_BYTES = onnx.checker.MAXIMUM_PROTOBUF - (64 << 20)
# Tensors smaller than this stay in the graph even in the external form: shape constants must be readable by
# shape inference and by TensorRT's parser without opening the data file.
_INLINE_TENSOR_BYTES = 1024
DATA_SUFFIX = ".data"


def data_file_name(path: str | Path) -> str:
    """The external-data file ``save`` writes for the graph at ``path``: ``model.onnx`` -> ``model.onnx.data``."""
    return Path(path).name + DATA_SUFFIX


def load(path: str | Path, *, weights: bool = True) -> onnx.ModelProto:
    """The model at ``path``; ``weights=False`` leaves external weights in their file (the graph, cheap at any size).

    A graph whose external-data file is missing raises ExportError naming it.
    """
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    if weights and has_external_data(model):
        missing = [name for name in _locations(model) if not (path.parent / name).is_file()]
        if missing:
            raise ExportError(
                f"{path.name} keeps its weights in {missing[0]}, which is missing beside it",
                "keep an ONNX graph and its .data file together in one directory",
            )
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model


def has_external_data(model: onnx.ModelProto) -> bool:
    """True when some initialiser of ``model`` refers to an external file instead of holding its values."""
    return any(external_data_helper.uses_external_data(t) for t in model.graph.initializer)


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` to ``path`` in the form its size needs; return ``path``.

    * a model loaded with ``weights=False`` whose weights are external: the graph alone is written, and its weights
      stay where they are (``path`` must be in the directory of the data file it refers to);
    * a model of ``EXTERNAL_DATA_MIN_BYTES`` or more: graph + ``<name>.data`` (``model`` is converted in place: its
      tensors no longer hold their values, do not reuse it);
    * otherwise one file. A stale ``<name>.data`` from an earlier save is removed (onnx appends to an existing one).
    """
    path = Path(path)
    data = path.with_name(data_file_name(path))
    if has_external_data(model):
        _check_references(model, path)
        onnx.save(model, str(path))
        return path
    if serialized_size(model) >= EXTERNAL_DATA_MIN_BYTES:
        data.unlink(missing_ok=True)
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=_INLINE_TENSOR_BYTES,
        )
        return path
    onnx.save(model, str(path))
    data.unlink(missing_ok=True)
    return path


def serialized_size(model: onnx.ModelProto) -> int:
    """About how many bytes ``model`` takes serialised, without serialising it: protobuf's own ``ByteSize`` refuses
    a message past 2 GiB, which is exactly the case to detect. Tensors, nodes (Constant values) and functions are
    summed part by part; the rest of the model is small."""
    graph = model.graph
    parts = [*graph.initializer, *graph.node, *graph.sparse_initializer, *model.functions]
    return sum(part.ByteSize() for part in parts)


def _check_references(model: onnx.ModelProto, path: Path) -> None:
    missing = sorted({name for name in _locations(model) if not (path.parent / name).is_file()})
    if missing:
        raise ExportError(
            f"{path.name} would refer to {', '.join(missing)}, which is not in {path.parent}",
            "write a graph whose weights are external into the directory of its .data file",
        )


def _locations(model: onnx.ModelProto) -> list[str]:
    locations = []
    for tensor in model.graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            info = {entry.key: entry.value for entry in tensor.external_data}
            locations.append(info["location"])
    return list(dict.fromkeys(locations))


def data_files(path: str | Path) -> list[Path]:
    """The external-data files the graph at ``path`` refers to (none for a one-file model), in its directory."""
    path = Path(path)
    return [path.parent / name for name in _locations(load(path, weights=False))]


def files(path: str | Path) -> list[Path]:
    """Every file the model at ``path`` consists of: the graph, then its external data."""
    return [Path(path), *data_files(path)]


def check(path: str | Path) -> None:
    """onnx.checker's full check, given the path so that models past 2 GB (and their data files) are checked too."""
    onnx.checker.check_model(str(path), full_check=True)


def graph_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its weights' values (they are marked external), for shape inference and analysis
    at any size: the copy costs the graph, not the weights. Small tensors (shape constants) are kept."""
    stubs = []
    for tensor in model.graph.initializer:
        if external_data_helper.uses_external_data(tensor) or tensor.ByteSize() < _INLINE_TENSOR_BYTES:
            stubs.append(tensor)
            continue
        stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value="__values_not_loaded__")
        stubs.append(stub)
    graph = onnx.helper.make_graph(
        list(model.graph.node),
        model.graph.name,
        list(model.graph.input),
        list(model.graph.output),
        initializer=stubs,
        value_info=list(model.graph.value_info),
    )
    light = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    light.metadata_props.extend(model.metadata_props)
    light.producer_name, light.producer_version = model.producer_name, model.producer_version
    light.functions.extend(model.functions)
    return light


@contextlib.contextmanager
def weights_in_a_file(model: onnx.ModelProto, beside: str | Path) -> Iterator[Path]:
    """A graph file whose weights are in an external file, for edited copies of ``model`` (the model at ``beside``,
    loaded with ``weights=False``) to refer to instead of each holding the weights in memory.

    A model whose weights are external already is its own file: ``beside`` is yielded. A one-file model is written
    once, split, into a temporary directory beside it, and ``model`` is left referring to that copy (its tensors are
    converted in place: the values move to the file); the directory is removed afterwards.
    """
    if has_external_data(model):
        yield Path(beside)
        return
    directory = Path(tempfile.mkdtemp(prefix=".weights-", dir=Path(beside).parent))
    try:
        path = directory / "model.onnx"
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_file_name(path),
            size_threshold=_INLINE_TENSOR_BYTES,
        )
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def session_source(model: onnx.ModelProto, beside: str | Path) -> Iterator[bytes | str]:
    """What ``onnxruntime.InferenceSession`` should open for an edited copy of the model at ``beside``.

    A one-file model is passed as bytes. A graph whose weights are external is written to a temporary file in
    ``beside``'s directory (its references are relative to it) and that path is yielded, then removed.
    """
    if not has_external_data(model):
        yield model.SerializeToString()
        return
    directory = Path(beside).parent
    fd, name = tempfile.mkstemp(prefix=".probe-", suffix=".onnx", dir=directory)
    os.close(fd)
    try:
        onnx.save(model, name)
        yield name
    finally:
        Path(name).unlink(missing_ok=True)


def replace(src: str | Path, dst: str | Path) -> Path:
    """Move the model at ``src`` (graph and data file) to ``dst`` on the same file system, replacing what is there;
    the graph's references are rewritten to the data file's new name (``dst.data``)."""
    src, dst = Path(src), Path(dst)
    model = load(src, weights=False)
    if not has_external_data(model):
        os.replace(src, dst)
        dst.with_name(data_file_name(dst)).unlink(missing_ok=True)
        return dst
    old = _locations(model)
    if len(old) != 1:
        raise ExportError(f"{src.name} spreads its weights over {len(old)} files", "save it with onnx_io.save first")
    new = data_file_name(dst)
    os.replace(src.parent / old[0], dst.parent / new)
    for tensor in model.graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = new
    onnx.save(model, str(dst))
    src.unlink()
    return dst


def remove(path: str | Path) -> None:
    """Delete the model at ``path``: its graph and its data file (either may be missing)."""
    path = Path(path)
    if path.is_file():
        for data in data_files(path):
            data.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    path.with_name(data_file_name(path)).unlink(missing_ok=True)
