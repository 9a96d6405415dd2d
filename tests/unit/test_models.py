"""Model registry and numpy state helpers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedmpq.errors import ConfigError
from fedmpq.models import build_model, model_names, quantizable_layers, register_model
from fedmpq.state import fingerprint, load_numpy_state, state_to_numpy

SHAPES = {
    "mlp": (1, 28, 28),
    "cnn": (1, 28, 28),
    "resnet20": (3, 32, 32),
    "resnet18": (3, 32, 32),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_builtin_names_are_registered() -> None:
    assert set(SHAPES) <= set(model_names())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_forward_shape(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_shape=SHAPES[name])
    out = model(torch.randn(3, *SHAPES[name]))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "shape"),
    [("mlp", (3, 32, 32)), ("cnn", (3, 32, 32)), ("resnet20", (1, 28, 28))],
)
def test_other_input_shapes(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, 10, shape)
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_resnet20_size() -> None:
    assert 260_000 <= n_params(build_model("resnet20", 10, (3, 32, 32))) <= 280_000


def test_resnet18_size() -> None:
    assert 10_500_000 <= n_params(build_model("resnet18", 10, (3, 32, 32))) <= 11_500_000


def test_resnet20_structure() -> None:
    model = build_model("resnet20", 10, (3, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # 1 stem conv + 3 stages x 3 blocks x 2 convs; option-A shortcuts add no convs.
    assert len(convs) == 19
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_cnn_is_small() -> None:
    assert n_params(build_model("cnn")) < 200_000


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_quantizable_layers_are_conv_and_linear_weights(name: str) -> None:
    model = build_model(name, 10, SHAPES[name])
    layers = quantizable_layers(model)
    expected = [
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    assert layers == expected
    params = dict(model.named_parameters())
    assert all(params[k].dim() in (2, 4) for k in layers)
    # Everything else (biases, BatchNorm) is left out.
    assert not any("bn" in k or k.endswith(".bias") for k in layers)


def test_quantizable_layers_cnn_names() -> None:
    layers = quantizable_layers(build_model("cnn"))
    assert layers[0] == "features.0.weight"
    assert len(layers) == 4


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ConfigError, match="resnet20"):
        build_model("vgg99")


@pytest.mark.parametrize(
    "kwargs",
    [{"num_classes": 1}, {"num_classes": True}, {"in_shape": (1, 28)}, {"in_shape": (0, 28, 28)}],
)
def test_bad_build_arguments(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        build_model("mlp", **kwargs)


def test_cnn_rejects_tiny_inputs() -> None:
    with pytest.raises(ConfigError, match="4x4"):
        build_model("cnn", 10, (1, 3, 3))


def test_register_model() -> None:
    def factory(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(in_shape)), num_classes))

    register_model("test-linear", factory)
    assert "test-linear" in model_names()
    model = build_model("test-linear", 4, (1, 2, 2))
    assert model(torch.zeros(1, 1, 2, 2)).shape == (1, 4)
    assert quantizable_layers(model) == ["1.weight"]
    with pytest.raises(ConfigError, match="already registered"):
        register_model("test-linear", factory)
    with pytest.raises(ConfigError):
        register_model("", factory)


def test_module_spec_builds_a_model_the_package_does_not_ship() -> None:
    model = build_model("module:examples.tiny_model:build", 10, (3, 32, 32))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert quantizable_layers(model) == [
        "stem.weight",
        "depthwise.weight",
        "pointwise.weight",
        "head.weight",
    ]


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("module:examples.tiny_model", "must look like"),
        ("module:no_such_package.mod:build", "cannot import"),
        ("module:examples.tiny_model:missing", "has no function"),
        ("module:builtins:dict", "expected nn.Module"),
        ("module:fedmpq.models:model_names", "cannot be called"),
    ],
)
def test_bad_module_specs_say_what_is_wrong(name: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model(name, 10, (1, 28, 28))


def test_module_prefix_cannot_be_registered() -> None:
    with pytest.raises(ConfigError, match="name modules"):
        register_model("module:x", nn.Identity)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_deterministic_init(name: str) -> None:
    torch.manual_seed(123)
    a = state_to_numpy(build_model(name, 10, SHAPES[name]))
    torch.manual_seed(123)
    b = state_to_numpy(build_model(name, 10, SHAPES[name]))
    torch.manual_seed(124)
    c = state_to_numpy(build_model(name, 10, SHAPES[name]))
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c)


def test_state_to_numpy_layout() -> None:
    model = build_model("resnet20", 10, (3, 32, 32))
    state = state_to_numpy(model)
    float_keys = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    assert list(state) == float_keys
    assert not any(k.endswith("num_batches_tracked") for k in state)
    assert any(k.endswith("running_mean") for k in state)
    for arr in state.values():
        assert arr.dtype == np.float32
        assert arr.flags.c_contiguous


def test_state_is_a_copy() -> None:
    model = build_model("mlp")
    state = state_to_numpy(model)
    before = state["classifier.1.weight"].copy()
    with torch.no_grad():
        model.classifier[1].weight.add_(1.0)
    np.testing.assert_array_equal(state["classifier.1.weight"], before)


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_state_round_trip(name: str) -> None:
    torch.manual_seed(1)
    src = build_model(name, 10, SHAPES[name])
    # Make BatchNorm running statistics non-trivial so buffers are exercised too.
    src.train()
    src(torch.randn(4, *SHAPES[name]))
    torch.manual_seed(2)
    dst = build_model(name, 10, SHAPES[name])
    tracked = {k: v.clone() for k, v in dst.state_dict().items() if not v.is_floating_point()}
    state = state_to_numpy(src)
    load_numpy_state(dst, state)
    assert fingerprint(state_to_numpy(dst)) == fingerprint(state)
    for k, v in tracked.items():
        assert torch.equal(dst.state_dict()[k], v)
    src.eval()
    dst.eval()
    x = torch.randn(2, *SHAPES[name])
    assert torch.equal(src(x), dst(x))


def test_load_wrong_shape_names_tensor_and_changes_nothing() -> None:
    model = build_model("mlp")
    before = fingerprint(state_to_numpy(model))
    state = state_to_numpy(model)
    state["classifier.3.weight"] = np.zeros((3, 3), np.float32)
    state["classifier.1.weight"] = state["classifier.1.weight"] + 1
    with pytest.raises(ConfigError, match=r"classifier\.3\.weight"):
        load_numpy_state(model, state)
    assert fingerprint(state_to_numpy(model)) == before


def test_load_missing_and_extra() -> None:
    model = build_model("mlp")
    state = state_to_numpy(model)
    missing = dict(state)
    del missing["classifier.5.bias"]
    with pytest.raises(ConfigError, match=r"missing.*classifier\.5\.bias"):
        load_numpy_state(model, missing)
    with pytest.raises(ConfigError, match="extra_tensor"):
        load_numpy_state(model, {**state, "extra_tensor": np.zeros(1, np.float32)})
    with pytest.raises(ConfigError, match="non-numeric"):
        load_numpy_state(model, {**state, "classifier.5.bias": np.array(["a"] * 10)})


def test_load_accepts_read_only_and_float64() -> None:
    model = build_model("mlp")
    state = {k: np.ones_like(v, dtype=np.float64) for k, v in state_to_numpy(model).items()}
    for arr in state.values():
        arr.flags.writeable = False
    load_numpy_state(model, state)
    assert all(np.all(v == 1) for v in state_to_numpy(model).values())


state_strategy = st.dictionaries(
    st.text(min_size=1, max_size=12),
    st.lists(st.floats(width=32), min_size=0, max_size=6).map(
        lambda xs: np.asarray(xs, dtype=np.float32)
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(state=state_strategy, data=st.data())
def test_fingerprint_sensitivity(state: dict[str, np.ndarray], data: st.DataObject) -> None:
    fp = fingerprint(state)
    assert len(fp) == 32 and int(fp, 16) >= 0
    # Independent of insertion order and of byte order / memory layout.
    assert fingerprint(dict(reversed(list(state.items())))) == fp
    assert fingerprint({k: v.astype(">f4") for k, v in state.items()}) == fp
    # Changing one value, a name, a shape or a dtype changes it.
    name = data.draw(st.sampled_from(sorted(state)))
    arr = state[name]
    if arr.size:
        i = data.draw(st.integers(0, arr.size - 1))
        changed = arr.copy()
        changed.view(np.uint32)[i] ^= 1  # flip the lowest bit: always a different value
        assert fingerprint({**state, name: changed}) != fp
        assert fingerprint({**state, name: arr.reshape(1, -1)}) != fp
    assert fingerprint({**state, name: arr.astype(np.float64)}) != fp
    renamed = {(k + "_" if k == name else k): v for k, v in state.items()}
    if len(set(renamed)) == len(state):
        assert fingerprint(renamed) != fp


def test_fingerprint_stable_across_processes() -> None:
    state = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(2, np.float32)}
    code = (
        "import numpy as np; from fedmpq.state import fingerprint; "
        "print(fingerprint({'a': np.ones(2, np.float32), "
        "'b': np.arange(6, dtype=np.float32).reshape(2, 3)}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == fingerprint(state)
