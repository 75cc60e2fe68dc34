"""Property-based tests (hypothesis) of the three places where arbitrary input meets peftx:

* the adapter-file loader (``read_adapter`` / ``load_adapter``): random tensor dicts, random bytes, truncated and
  bit-flipped files, damaged records -> loaded, or a typed PeftxError (never another exception, never a hang), and
  a refused file leaves the model exactly as it was;
* the VTAB-1k list parser: random lines -> parsed inside the root, or a DataError naming ``file:line``;
* merge / unmerge of RLRRLinear, LoRALinear and AOFTLinear around random nn.Linear layers: unmerge restores the
  weights, and the merged layer computes what the unmerged one does (within peftx/tolerances.py's MERGE_FP32).

Every property counts the examples it ran; the last test prints the counts (through ``capsys.disabled()`` so they
show without ``-s``) and checks each property really ran.
"""

from __future__ import annotations

import copy
import json
import struct
import tempfile
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import perturb_adapter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from peftx.adapter import adapt, state_of
from peftx.adapter_io import ADAPTER_FILE, load_adapter, read_adapter, save_adapter
from peftx.data import parse_vtab_list
from peftx.errors import DataError, NonFiniteError, PeftxError
from peftx.methods import AOFTLinear, LoRALinear, RLRRLinear, make_config
from peftx.tolerances import MERGE_FP32

COUNTS: Counter = Counter()
OUTCOMES: Counter = Counter()  # (loader input kind, 'ok' or the error class) -> examples
# Enough examples to explore each input space, few enough for the file to run in well under a minute on 2 cores.
FAST = settings(
    max_examples=100,
    deadline=timedelta(seconds=10),
    derandomize=False,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
MODEL = settings(FAST, max_examples=50)


# ---------------------------------------------------------------------------------------------------- adapter loader


class Loader:
    """A plain tiny ViT, the adapter file a LoRA run would write for it, and that file's parts."""

    def __init__(self, root: Path):
        import timm

        torch.manual_seed(0)  # a one-block, 32-wide ViT: every example copies it, so it must be cheap
        self.plain = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            num_classes=3,
            img_size=32,
            depth=1,
            embed_dim=32,
            num_heads=2,
            exportable=True,
        ).eval()
        model = adapt(copy.deepcopy(self.plain), make_config("lora", r=2, targets=("q", "v", "fc2")))
        perturb_adapter(model, std=0.1)
        self.path = save_adapter(model, root / "good")
        self.bytes = self.path.read_bytes()
        with safe_open(str(self.path), framework="pt") as f:
            self.meta = json.loads(f.metadata()["peftx_config"])
            self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.plain_state = {k: v.clone() for k, v in self.plain.state_dict().items()}
        self.root = root

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.plain)

    def assert_untouched(self, model: nn.Module) -> None:
        assert getattr(model, "peftx_state", None) is None, "a refused file left the model adapted"
        state = model.state_dict()
        assert state.keys() == self.plain_state.keys(), "a refused file left wrapped layers behind"
        for k, v in self.plain_state.items():
            assert torch.equal(state[k], v), f"a refused file changed {k}"
        assert all(p.requires_grad for p in model.parameters()), "a refused file froze parameters"


@pytest.fixture(scope="module")
def loader(tmp_path_factory) -> Loader:
    return Loader(tmp_path_factory.mktemp("loader"))


def _load(loader: Loader, path: Path, kind: str) -> str:
    """Load ``path`` onto a fresh plain model: 'ok', or the PeftxError's class name. Anything else fails the test."""
    COUNTS[f"adapter loader: {kind}"] += 1
    outcome = "ok"
    try:
        read_adapter(path)
        model = loader.fresh()
        try:
            load_adapter(model, path)
        except PeftxError:
            loader.assert_untouched(model)
            raise
        assert state_of(model).num_classes == loader.meta["num_classes"]
    except PeftxError as e:
        assert e.message and "\n" not in e.message
        outcome = type(e).__name__
    OUTCOMES[kind, outcome] += 1
    return outcome


def _write(loader: Loader, name: str, data: bytes) -> Path:
    path = Path(tempfile.mkdtemp(dir=loader.root)) / name
    path.write_bytes(data)
    return path


DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]


@st.composite
def tensor_edits(draw, names: list[str]):
    """A list of edits to apply to the good file's tensors."""
    edit = st.one_of(
        st.tuples(st.just("drop"), st.sampled_from(names)),
        st.tuples(st.just("extra"), st.text(min_size=1, max_size=20)),
        st.tuples(
            st.just("reshape"), st.sampled_from(names), st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
        ),
        st.tuples(st.just("dtype"), st.sampled_from(names), st.sampled_from(DTYPES)),
        st.tuples(
            st.just("value"),
            st.sampled_from(names),
            st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e38, -0.0, 5e-45]),
        ),
    )
    return draw(st.lists(edit, min_size=0, max_size=4))


def _apply(tensors: dict[str, torch.Tensor], edits) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in tensors.items()}
    for e in edits:
        if e[0] == "drop":
            out.pop(e[1], None)
        elif e[0] == "extra":
            out[e[1]] = torch.randn(3)
        elif e[0] == "reshape" and e[1] in out:
            out[e[1]] = torch.randn(e[2])
        elif e[0] == "dtype" and e[1] in out:
            out[e[1]] = out[e[1]].to(e[2])
        elif e[0] == "value" and e[1] in out and out[e[1]].numel() and out[e[1]].is_floating_point():
            out[e[1]].view(-1)[0] = e[2]
    return out


@MODEL
@given(data=st.data())
def test_loader_random_tensor_dicts(loader, data):
    edits = data.draw(tensor_edits(sorted(loader.tensors)))
    tensors = _apply(loader.tensors, edits)
    path = Path(tempfile.mkdtemp(dir=loader.root)) / ADAPTER_FILE
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"peftx_config": json.dumps(loader.meta)}
    )
    outcome = _load(loader, path, "random tensor dicts")
    unchanged = (
        all(torch.equal(tensors.get(k, torch.empty(0)), v) for k, v in loader.tensors.items())
        and tensors.keys() == loader.tensors.keys()
    )
    if unchanged:
        assert outcome == "ok"
    if any(not v.is_floating_point() for v in tensors.values()) or tensors.keys() != loader.tensors.keys():
        assert outcome != "ok"
    if outcome == "ok":  # whatever was accepted is finite and of the right shapes
        assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


@FAST
@given(
    blob=st.one_of(
        st.binary(max_size=2048),
        # a plausible safetensors start: a little-endian header length, then JSON-ish text and junk
        st.tuples(st.integers(0, 2**64 - 1), st.text(max_size=200), st.binary(max_size=256)).map(
            lambda t: struct.pack("<Q", t[0]) + t[1].encode("utf-8", "surrogatepass") + t[2]
        ),
        st.tuples(st.text(max_size=300), st.binary(max_size=64)).map(
            lambda t: (
                struct.pack("<Q", len(t[0].encode("utf-8", "surrogatepass")))
                + t[0].encode("utf-8", "surrogatepass")
                + t[1]
            )
        ),
    )
)
def test_loader_random_bytes(loader, blob):
    outcome = _load(loader, _write(loader, ADAPTER_FILE, blob), "random bytes")
    assert outcome != "ok"


@FAST
@given(
    cut=st.none() | st.integers(0, 10**9),
    flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), max_size=3),
)
def test_loader_truncated_or_flipped_files(loader, cut, flips):
    data = bytearray(loader.bytes)
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    data = bytes(data if cut is None else data[: cut % (len(data) + 1)])
    outcome = _load(loader, _write(loader, ADAPTER_FILE, data), "truncated / bit-flipped files")
    if len(data) < len(loader.bytes):
        assert outcome != "ok"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
RECORD_KEYS = [
    "format",
    "format_version",
    "method",
    "config",
    "num_classes",
    "base_fingerprint",
    "spec",
    "class_names",
    "data_config",
]


@MODEL
@given(
    changes=st.dictionaries(st.sampled_from(RECORD_KEYS), JSON, max_size=3),
    method_changes=st.dictionaries(
        st.sampled_from(["method", "r", "alpha", "targets", "rank", "scale", "x"]), JSON, max_size=2
    ),
)
def test_loader_damaged_records(loader, changes, method_changes):
    meta = copy.deepcopy(loader.meta)
    meta.update(changes)
    if method_changes and isinstance(meta.get("config"), dict):
        meta["config"].update(method_changes)
    path = Path(tempfile.mkdtemp(dir=loader.root)) / ADAPTER_FILE
    save_file(loader.tensors, str(path), metadata={"peftx_config": json.dumps(meta)})
    outcome = _load(loader, path, "damaged records")
    expected = _expected_record_outcome(loader.meta, json.loads(json.dumps(meta)))
    COUNTS[f"damaged records: expected {expected}"] += 1
    if expected == "ok":
        assert outcome == "ok", (changes, method_changes)
    elif expected == "refused":
        assert outcome != "ok", (changes, method_changes)


def _same(a, b) -> bool:
    """Equal as JSON values (so 3.0 differs from 3, and true from 1, as they do to the loader's type checks)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _expected_record_outcome(good: dict, meta: dict) -> str:
    """What loading a record must give: 'ok', 'refused' (some PeftxError), or 'unknown' where the change's validity
    is not modelled here (e.g. another finite alpha loads, a zero alpha does not)."""
    if _same(meta, good):
        return "ok"
    # the fields that bind the file to its model: another value there is always refused
    if any(not _same(meta.get(k), good[k]) for k in ("format", "num_classes", "base_fingerprint")):
        return "refused"
    version = meta.get("format_version")
    if not isinstance(version, int) or version > good["format_version"]:  # bool is an int to the loader, too
        return "refused"
    cfg, good_cfg = meta.get("config"), good["config"]
    if (
        not isinstance(cfg, dict)
        or set(cfg) - set(good_cfg)
        or not _same(cfg.get("method"), good_cfg["method"])
        or not _same(cfg.get("r"), good_cfg["r"])
    ):
        return "refused"  # another method, an unknown field, or a rank that changes the tensors' shapes
    targets = cfg.get("targets")
    same_targets = (
        isinstance(targets, list)
        and all(isinstance(t, str) for t in targets)
        and set(targets) == set(good_cfg["targets"])
    )
    if not same_targets:
        return "refused"  # other layers: other tensor names (or not a list of roles at all)
    changed = {k for k in set(meta) | set(good) if not _same(meta.get(k), good.get(k))}
    if changed <= {"method"} and all(_same(cfg.get(k), v) for k, v in good_cfg.items() if k != "targets"):
        return "ok"  # the top-level method name is informational; the settings under "config" are what load
    return "unknown"


# ---------------------------------------------------------------------------------------------------- VTAB lists


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("vtab")
    root = base / "task"
    (root / "images" / "sub").mkdir(parents=True)
    (root / "images" / "dir").mkdir()
    for rel in ("images/a.png", "images/sub/b.png", "images/with space.png"):
        (root / rel).write_bytes(b"\x89PNG\r\n\x1a\n")
    (base / "outside.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "in_link.png").symlink_to(root / "images" / "a.png")
    (root / "out_link.png").symlink_to(base / "outside.png")
    (root / "loop.png").symlink_to(root / "loop.png")
    return root


PATHS = [
    "images/a.png",
    "images/sub/b.png",
    "images/with space.png",
    "in_link.png",
    "out_link.png",
    "loop.png",
    "../outside.png",
    "images/../images/a.png",
    "images/../../outside.png",
    "./images/a.png",
    "/etc/hostname",
    "C:\\x.png",
    "\\\\server\\share\\x.png",
    "images\\..\\..\\outside.png",
    "images/nope.png",
    "images/dir",
    "images",
    "~/x.png",
    "images/a.png\x00.txt",
    "a" * 300,
    "images//a.png",
    "ímages/á.png",
]
LABELS = ["0", "1", "7", "-1", "x", "1.5", "+2", "٣", "1_0", "99999999999999999999999", "", "0x1", "nan"]
SEPARATORS = [" ", "\t", "  ", " \t "]


@st.composite
def list_lines(draw):
    structured = st.builds(
        lambda p, s, label, pre, post: f"{pre}{p}{s}{label}{post}",
        st.sampled_from(PATHS) | st.text(max_size=20),
        st.sampled_from(SEPARATORS),
        st.sampled_from(LABELS) | st.text(max_size=5),
        st.sampled_from(["", " ", "\t"]),
        st.sampled_from(["", " ", "\r", " extra"]),
    )
    noise = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
    return draw(st.lists(structured | noise | st.just(""), max_size=12))


@settings(FAST, max_examples=150)
@given(lines=list_lines())
def test_vtab_list_parser(vtab_root, lines):
    COUNTS["vtab list parser: random lines"] += 1
    text = "\n".join(lines)
    path = Path(tempfile.mkdtemp(dir=vtab_root.parent)) / "train800.txt"
    path.write_text(text, encoding="utf-8")
    numbered = text.splitlines()  # what the parser numbers (every line break Python recognises)
    real_root = vtab_root.resolve()
    try:
        samples = parse_vtab_list(path, vtab_root)
    except DataError as e:
        prefix = f"{path}:"
        assert e.message.startswith(prefix), e.message  # every complaint names file:line
        lineno = int(e.message[len(prefix) :].split(":", 1)[0])
        assert 1 <= lineno <= len(numbered) and numbered[lineno - 1].strip()
        # every earlier line was fine on its own
        good = "\n".join(numbered[: lineno - 1])
        path.write_text(good, encoding="utf-8")
        parse_vtab_list(path, vtab_root)
        return
    assert len(samples) == sum(1 for line in numbered if line.strip())
    for image, label in samples:
        assert isinstance(label, int) and label >= 0
        assert image.resolve().is_relative_to(real_root), f"{image} escapes the root"
        assert image.resolve().is_file()


@FAST
@given(blob=st.binary(max_size=200))
def test_vtab_list_parser_bytes(vtab_root, blob):
    COUNTS["vtab list parser: random bytes"] += 1
    path = Path(tempfile.mkdtemp(dir=vtab_root.parent)) / "val200.txt"
    path.write_bytes(blob)
    try:
        samples = parse_vtab_list(path, vtab_root)
    except DataError as e:
        assert e.message.startswith(f"{path}") or e.message.startswith(f"cannot read list file {path}")
        return
    for image, _ in samples:
        assert image.resolve().is_relative_to(vtab_root.resolve())


# ---------------------------------------------------------------------------------------------------- merge


@st.composite
def layers(draw):
    """(method, wrapped layer, input batch): random sizes, random weights and adapter values, fixed by a seed."""
    method = draw(st.sampled_from(["rlrr", "lora", "aoft"]))
    groups = draw(st.sampled_from([1, 3]))
    out = groups * draw(st.integers(1, 12))
    inp = draw(st.integers(1, 24))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    w_scale = draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    a_scale = draw(st.sampled_from([0.0, 1e-3, 0.1, 0.5]))
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out, inp, generator=g) * w_scale)
        if bias:
            base.bias.copy_(torch.randn(out, generator=g) * w_scale)
    if method == "rlrr":
        layer = RLRRLinear(base, "layer", col_groups=groups, init="normal")
    else:
        slices = tuple(sorted(draw(st.sets(st.integers(0, groups - 1), min_size=1))))
        rank = draw(st.integers(1, min(out // groups, inp)))
        layer = (
            LoRALinear(base, "layer", groups, slices, r=rank, alpha=draw(st.sampled_from([1.0, 8.0, -2.0])))
            if method == "lora"
            else AOFTLinear(base, "layer", groups, slices, rank=rank, scale=draw(st.sampled_from([1.0, 0.5])))
        )
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("base_layer."):
                continue
            if name in ("q_up", "q_down"):  # generators: random directions, norm near 1 (as trained)
                p.copy_(torch.randn(p.shape, generator=g))
                p.div_(p.norm(dim=-1, keepdim=True).clamp_min(1e-6))
                p[..., 0].abs_()
            else:
                # RLRR: |s_row|,|s_col| <= 0.7 keeps 1 + s_row s_col^T >= 0.51, so unmerge is well conditioned
                bound = 0.7 if method == "rlrr" and name in ("s_row", "s_col") else float("inf")
                p.copy_(
                    (torch.randn(p.shape, generator=g) * a_scale * (1.0 if method != "rlrr" else 1.4)).clamp(
                        -bound, bound
                    )
                )
    x = torch.randn(draw(st.integers(1, 5)), inp, generator=g)
    return method, layer, x


@settings(FAST, max_examples=150)
@given(case=layers())
def test_merge_then_unmerge_restores_and_matches(case):
    method, layer, x = case
    COUNTS[f"merge/unmerge: {method}"] += 1
    w0 = layer.base_layer.weight.detach().clone()
    b0 = None if layer.base_layer.bias is None else layer.base_layer.bias.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged
        merged = layer(x)
        wm = layer.base_layer.weight.detach().clone()
        bm = None if b0 is None else layer.base_layer.bias.detach().clone()
    bound = MERGE_FP32.bound(unmerged.abs().max().item())
    # fp32 rounding of W·x itself is allowed on top of the contract: |x|·|W| bounds what cancellation can amplify
    rounding = 4 * torch.finfo(torch.float32).eps * (x.abs() @ (layer.base_layer.weight.abs().T)).max().item()
    assert (merged - unmerged).abs().max().item() <= bound + rounding, method
    with torch.no_grad():
        layer.unmerge()
    assert not layer.merged
    # Restored to FP32 rounding of the largest value each element held (the merged one is stored in FP32):
    # elementwise |restored - original| <= 4 eps (|original| + |merged|).
    eps = torch.finfo(torch.float32).eps
    for now, before, merged_t in ((layer.base_layer.weight, w0, wm), (layer.base_layer.bias, b0, bm)):
        if before is not None:
            assert ((now - before).abs() <= 4 * eps * (before.abs() + merged_t.abs())).all(), method
    with torch.no_grad():
        again = layer(x)
    assert (again - unmerged).abs().max().item() <= bound + rounding


@settings(FAST, max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), out=st.integers(1, 8), inp=st.integers(1, 8))
def test_rlrr_unmerge_refuses_a_zero_denominator(seed, out, inp):
    """Where 1 + s_row s_col^T is 0, unmerge cannot recover W: a typed NonFiniteError, and nothing changes."""
    COUNTS["merge/unmerge: rlrr singular"] += 1
    g = torch.Generator().manual_seed(seed)
    layer = RLRRLinear(nn.Linear(inp, out), "layer", init="zeros")
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.randn(out, inp, generator=g))
        layer.s_row.fill_(-1.0)
        layer.s_col.fill_(1.0)  # S = -1 everywhere: W' = W - W = 0
        layer.merge()
        merged_w = layer.base_layer.weight.clone()
    with pytest.raises(NonFiniteError):
        layer.unmerge()
    assert layer.merged and torch.equal(layer.base_layer.weight, merged_w)


# ---------------------------------------------------------------------------------------------------- the counts


PROPERTY_TESTS = {
    "test_loader_random_tensor_dicts": ["adapter loader: random tensor dicts"],
    "test_loader_random_bytes": ["adapter loader: random bytes"],
    "test_loader_truncated_or_flipped_files": ["adapter loader: truncated / bit-flipped files"],
    "test_loader_damaged_records": [
        "adapter loader: damaged records",
        "damaged records: expected ok",
        "damaged records: expected refused",
    ],
    "test_vtab_list_parser": ["vtab list parser: random lines"],
    "test_vtab_list_parser_bytes": ["vtab list parser: random bytes"],
    "test_merge_then_unmerge_restores_and_matches": [
        "merge/unmerge: rlrr",
        "merge/unmerge: lora",
        "merge/unmerge: aoft",
    ],
    "test_rlrr_unmerge_refuses_a_zero_denominator": ["merge/unmerge: rlrr singular"],
}


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    """After this module's tests, whatever order they ran in: print how many cases each property ran, and check
    that each selected property ran at least one."""
    yield
    selected = {item.originalname for item in request.session.items if item.path == request.path}
    keys = [k for name, ks in PROPERTY_TESTS.items() if name in selected for k in ks]
    if not keys:
        return
    ran = {k: COUNTS[k] for k in keys}
    outcomes: dict[str, list[str]] = {}
    for (kind, outcome), n in sorted(OUTCOMES.items()):
        outcomes.setdefault(kind, []).append(f"{outcome} {n}")
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(
            "\nhypothesis cases run: " + ", ".join(f"{k}={v}" for k, v in ran.items()) + f" (total {sum(ran.values())})"
        )
        for kind, parts in outcomes.items():
            print(f"  loader outcomes, {kind}: {', '.join(parts)}")
    missing = [k for k, v in ran.items() if v == 0]
    assert not missing, f"properties that ran no example: {missing}"
