"""Encoder adapters: token shapes and order, equality with the wrapped models' own outputs, FUNGI default layers."""

import copy
import logging
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.models.encoders import (CallableEncoder, ConvEncoder, Encoder, HubViTEncoder,
                                               TimmViTEncoder, TorchvisionViTEncoder,
                                               module_fingerprint)
from hummingbird_fungi.models.factory import create_encoder
from hummingbird_fungi.testing import (TinyCNN, TinyDinoHub, TinyDinov2Hub, patch_token_fn, tiny_timm_vit,
                                       tiny_torchvision_vit)

E = 32
SIZES = ((64, 64), (48, 80))

# name -> (builder of a fresh encoder, expected number of prefix tokens)
ADAPTERS: dict[str, tuple[Callable[[], Encoder], int]] = {
    "timm": (lambda: TimmViTEncoder(tiny_timm_vit()), 1),
    "timm_registers": (lambda: TimmViTEncoder(tiny_timm_vit(reg_tokens=2)), 3),
    "dino_hub": (lambda: HubViTEncoder(TinyDinoHub()), 1),
    "dinov2_hub": (lambda: HubViTEncoder(TinyDinov2Hub(num_register_tokens=4)), 5),
    "torchvision": (lambda: TorchvisionViTEncoder(tiny_torchvision_vit()), 1),
    "cnn": (lambda: ConvEncoder(TinyCNN(stride=16, dim=E), stride=16), 0),
    "callable": (lambda: CallableEncoder(tiny_timm_vit(), patch_token_fn, patch_size=16, embed_dim=E), 0),
}


def images(height: int = 64, width: int = 64, batch: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def resolve(model: nn.Module, path: str) -> nn.Module:
    """Dotted path with negative indices, as FUNGI looks layers up."""
    for part in path.split("."):
        model = model[int(part)] if part.lstrip("-").isdigit() else getattr(model, part)
    return model


@pytest.mark.parametrize("kind", ADAPTERS)
def test_adapter_shapes_and_grid_errors(kind):
    build, prefix = ADAPTERS[kind]
    encoder = build()
    assert encoder.num_prefix_tokens == prefix
    assert (encoder.patch_size, encoder.embed_dim) == (16, E)
    assert not encoder.model.training
    for height, width in SIZES:
        x = images(height, width)
        h, w = encoder.grid_size(height, width)
        assert (h, w) == (height // 16, width // 16)
        tokens = encoder.forward_tokens(x)
        patches = encoder(x)
        assert tokens.shape == (2, prefix + h * w, E)
        assert patches.shape == (2, h * w, E)
        assert torch.equal(patches, tokens[:, prefix:])
    with pytest.raises(ConfigError, match=rf"50x64 .*patch size 16 .*{encoder.name}"):
        encoder(images(50, 64))


def test_adapters_set_eval_but_keep_requires_grad():
    model = tiny_timm_vit().train()
    model.blocks[0].requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    encoder = TimmViTEncoder(model)
    assert not model.training and not any(m.training for m in model.modules())
    assert [p.requires_grad for p in encoder.model.parameters()] == flags


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_timm_static_model_is_switched_to_dynamic_size(reg_tokens, caplog):
    model = tiny_timm_vit(dynamic=False, reg_tokens=reg_tokens)
    untouched = copy.deepcopy(model)
    x = images()
    with caplog.at_level(logging.INFO, logger="hummingbird_fungi.models.encoders"):
        encoder = TimmViTEncoder(model)
    assert "dynamic input size" in caplog.text
    assert model.dynamic_img_size and not untouched.dynamic_img_size
    assert module_fingerprint(model) == module_fingerprint(untouched)
    with torch.no_grad():
        assert torch.equal(encoder.forward_tokens(x), untouched.forward_features(x))
        assert encoder(images(48, 80)).shape == (2, 15, E)
        with pytest.raises(AssertionError):  # what the switch fixes
            untouched.forward_features(images(48, 80))


def test_torchvision_matches_torchvision_at_native_size_and_resizes_pos_embed():
    model = tiny_torchvision_vit()
    encoder = TorchvisionViTEncoder(model)
    x = images()
    with torch.no_grad():
        seq = model._process_input(x)
        expected = model.encoder(torch.cat([model.class_token.expand(2, -1, -1), seq], dim=1))
        assert torch.equal(encoder.forward_tokens(x), expected)
        # the same image twice side by side: a 4x8 grid with resized positions, so the left half differs
        wide = encoder(torch.cat([x, x], dim=-1))
        native = encoder(x)
    assert wide.shape == (2, 4 * 8, E)
    left = wide.reshape(2, 4, 8, E)[:, :, :4].reshape(2, 16, E)
    assert not torch.allclose(left, native, atol=1e-3)
    assert torch.isfinite(wide).all()


def test_hub_dinov2_tokens_are_cls_registers_patches():
    model = TinyDinov2Hub(num_register_tokens=4)
    encoder = HubViTEncoder(model)
    x = images(48, 80)
    with torch.no_grad():
        out = model.forward_features(x)
        expected = torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"],
                              out["x_norm_patchtokens"]], dim=1)
        assert torch.equal(encoder.forward_tokens(x), expected)
        assert torch.equal(encoder(x), out["x_norm_patchtokens"])


def test_hub_dino_v1_tokens_are_get_intermediate_layers():
    model = TinyDinoHub()
    encoder = HubViTEncoder(model)
    x = images(48, 80)
    with torch.no_grad():
        assert torch.equal(encoder.forward_tokens(x), model.get_intermediate_layers(x, n=1)[0])


def test_cnn_tokens_are_the_map_row_major():
    model = TinyCNN(stride=16, dim=E)
    encoder = ConvEncoder(model, stride=16)
    x = images(48, 80)
    with torch.no_grad():
        feature_map = model(x)  # (2, E, 3, 5)
        tokens = encoder(x)
    i, j = 2, 1
    assert torch.equal(tokens[1, i * 5 + j], feature_map[1, :, i, j])


def test_cnn_wrong_stride_names_shapes():
    with pytest.raises(ConfigError, match=r"\(1, 32, 1, 1\).*\(1, C, 2, 2\).*stride 8"):
        ConvEncoder(TinyCNN(stride=16, dim=E), stride=8)


class TwoMaps(nn.Module):
    """A backbone returning a dict of maps, like torchvision's IntermediateLayerGetter."""

    def __init__(self) -> None:
        super().__init__()
        self.c8, self.c16 = TinyCNN(stride=8, dim=8), TinyCNN(stride=16, dim=E)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"c8": self.c8(x), "c16": self.c16(x)}


def test_cnn_dict_output_needs_a_key():
    with pytest.raises(ConfigError, match="output="):
        ConvEncoder(TwoMaps(), stride=16)
    encoder = ConvEncoder(TwoMaps(), stride=8, output="c8")
    assert encoder.embed_dim == 8
    assert encoder(images(48, 80)).shape == (2, 6 * 10, 8)


def test_callable_tuple_or_tensor_and_shape_checks():
    model = tiny_timm_vit()
    x = images(48, 80)
    with torch.no_grad():
        expected = model.forward_features(x)[:, 1:]
        assert torch.equal(CallableEncoder(model, patch_token_fn, 16, E)(x), expected)
        plain = CallableEncoder(model, lambda m, im: patch_token_fn(m, im)[0], 16, E)
        assert torch.equal(plain(x), expected)
        with pytest.raises(ConfigError, match=r"\(2, 15, 32\).*\(2, 60, 32\)"):
            CallableEncoder(model, patch_token_fn, patch_size=8, embed_dim=E)(x)
        with pytest.raises(ConfigError, match=r"\(2, 15, 32\).*\(2, 15, 16\)"):
            CallableEncoder(model, patch_token_fn, patch_size=16, embed_dim=16)(x)


PATCH_LAYERS = {"timm": "blocks.-1.attn.qkv", "timm_registers": "blocks.-1.attn.qkv", "dino_hub": "blocks.-1.attn.qkv",
                "dinov2_hub": "blocks.-1.attn.qkv", "torchvision": "encoder.layers.-1.mlp.3"}


@pytest.mark.parametrize("which", ["default_layer", "patch_layer"])
@pytest.mark.parametrize("kind", ["timm", "timm_registers", "dino_hub", "dinov2_hub", "torchvision"])
def test_default_layer_is_a_linear_that_runs_once_with_grad_after_it(kind, which):
    encoder = ADAPTERS[kind][0]()
    assert encoder.patch_layer == PATCH_LAYERS[kind]
    layer = resolve(encoder.model, getattr(encoder, which))
    assert isinstance(layer, nn.Linear)
    calls = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        """What FUNGI does: a grad-requiring leaf at the layer, autograd on for the rest of the pass."""
        calls.append(output.shape)
        torch.set_grad_enabled(True)
        return output.detach().requires_grad_(True)

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            tokens = encoder.forward_tokens(images(48, 80))
    finally:
        handle.remove()
    assert len(calls) == 1
    assert tokens.requires_grad  # forward_tokens does not switch autograd off itself


def test_torchvision_attention_out_proj_hook_never_fires():
    encoder = TorchvisionViTEncoder(tiny_torchvision_vit())
    assert encoder.default_layer == "encoder.layers.-1.mlp.3"
    calls = []
    out_proj = encoder.model.encoder.layers[-1].self_attention.out_proj
    assert isinstance(out_proj, nn.Linear)
    handle = out_proj.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            encoder(images())
    finally:
        handle.remove()
    assert calls == []


def test_cnn_and_callable_have_no_default_layer():
    for kind in ("cnn", "callable"):
        encoder = ADAPTERS[kind][0]()
        assert encoder.default_layer is None and encoder.patch_layer is None


def test_module_fingerprint_and_default_ids():
    assert module_fingerprint(tiny_timm_vit(seed=0)) == module_fingerprint(tiny_timm_vit(seed=0))
    assert module_fingerprint(tiny_timm_vit(seed=0)) != module_fingerprint(tiny_timm_vit(seed=1))
    assert len(module_fingerprint(TinyCNN())) == 16
    model = tiny_timm_vit(seed=3)
    encoder = TimmViTEncoder(model)
    assert encoder.weights_id == f"module:{module_fingerprint(model)}"
    assert encoder.name == "VisionTransformer"
    named = TimmViTEncoder(tiny_timm_vit(), name="mine", weights_id="file:0123456789abcdef")
    assert (named.name, named.weights_id) == ("mine", "file:0123456789abcdef")


def test_create_encoder_dispatch():
    cases = [
        (tiny_timm_vit(dynamic=False), {}, TimmViTEncoder),
        (tiny_torchvision_vit(), {}, TorchvisionViTEncoder),
        (TinyDinoHub(), {}, HubViTEncoder),
        (TinyDinov2Hub(), {}, HubViTEncoder),
        (TinyCNN(), {"stride": 16}, ConvEncoder),
        (tiny_timm_vit(), {"feature_fn": patch_token_fn, "patch_size": 16, "embed_dim": E}, CallableEncoder),
    ]
    for model, kwargs, cls in cases:
        encoder = create_encoder(model, device="cpu", **kwargs)
        assert type(encoder) is cls and encoder.model is model
        assert encoder.name == type(model).__name__
        assert encoder(images(48, 80)).shape == (2, 15, E)
    assert create_encoder(encoder) is encoder
    assert create_encoder(TinyCNN(), stride=16, name="cnn").name == "cnn"


def test_create_encoder_errors():
    with pytest.raises(ConfigError, match=r"feature_fn=.*stride="):
        create_encoder(nn.Linear(3, 3))
    with pytest.raises(ConfigError, match=r"feature_fn=.*stride="):
        create_encoder(object())
    with pytest.raises(ConfigError, match="patch_size="):
        create_encoder(tiny_timm_vit(), feature_fn=patch_token_fn)
    with pytest.raises(ConfigError, match="stride"):
        create_encoder(tiny_timm_vit(), stride=16)
    with pytest.raises(ConfigError, match="pretrained"):
        create_encoder(TinyCNN(), stride=16, pretrained=False)
