"""Backbones: name resolution, token shapes, random/hub/file weights in timm and FAIR DINO/DINOv2 layouts."""

import hashlib
import logging
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import hummingbird_fungi.models.backbones as bb
from hummingbird_fungi.models.encoders import TimmViTEncoder
from hummingbird_fungi.models.backbones import SHORT_NAMES, file_sha256, hub_weights_cached, load_backbone, resolve_name
from hummingbird_fungi.errors import ConfigError, DataError

SMALL = dict(depth=2, embed_dim=48, num_heads=2)  # tiny ViT overrides accepted by every timm ViT name


def tiny(name: str = "vit_tiny_patch16_224", seed: int = 0, **overrides) -> TimmViTEncoder:
    """A tiny random backbone with every parameter randomised (so layer scales and tokens matter)."""
    torch.manual_seed(seed)
    backbone = load_backbone(name, pretrained=False, **{**SMALL, **overrides})
    with torch.no_grad():
        for param in backbone.parameters():
            param.normal_(0.0, 0.3)
    return backbone


def image(height: int, width: int, batch: int = 2) -> torch.Tensor:
    """Random (B, 3, H, W) input, the same on every call."""
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def assert_same_tokens(loaded: TimmViTEncoder, original: TimmViTEncoder, height: int, width: int) -> None:
    """Both backbones give the same tokens, prefix tokens included."""
    x = image(height, width)
    torch.testing.assert_close(loaded.forward_tokens(x), original.forward_tokens(x), rtol=1e-5, atol=1e-5)


def to_fair_dinov2(state_dict: dict[str, torch.Tensor], swiglu: bool = False, chunk: int = 0) -> dict:
    """Invert timm's DINOv2 conversion: FAIR keys, mask/register tokens, CLS pos, chunks, wrapped as a teacher."""
    sd = dict(state_dict)
    dim = sd["cls_token"].shape[-1]
    fair = {"mask_token": torch.zeros(1, dim)}
    if "reg_token" in sd:  # FAIR: pos_embed covers CLS too; timm folds CLS's position into cls_token
        cls_pos = torch.randn(1, 1, dim)
        fair["register_tokens"] = sd.pop("reg_token")
        fair["cls_token"] = sd.pop("cls_token") - cls_pos
        fair["pos_embed"] = torch.cat([cls_pos, sd.pop("pos_embed")], dim=1)
    for key, value in sd.items():
        if swiglu:
            key = key.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
        if chunk:
            key = re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m[1]) // chunk}.{m[1]}.", key)
        fair[key] = value
    teacher = {f"backbone.{key}": value for key, value in fair.items()}
    teacher |= {"dino_head.mlp.0.weight": torch.randn(8, dim), "ibot_head.last_layer.weight": torch.randn(4, 8)}
    return {"teacher": teacher, "iteration": 7}


# --------------------------------------------------------------------------- names


def test_short_names_resolve_to_timm_pretrained_names() -> None:
    pretrained = set(timm.list_pretrained())
    assert resolve_name("dino_vits16") == "vit_small_patch16_224.dino"
    assert resolve_name("dinov2_vitg14") == "vit_giant_patch14_dinov2.lvd142m"
    assert resolve_name("dinov2_vitb14_reg") == "vit_base_patch14_reg4_dinov2.lvd142m"
    assert all(timm_name in pretrained for timm_name in SHORT_NAMES.values())
    assert resolve_name("vit_tiny_patch16_224") == "vit_tiny_patch16_224"
    assert resolve_name("vit_small_patch8_224.dino") == "vit_small_patch8_224.dino"


@pytest.mark.parametrize("name, suggestion", [("dinov2_vits15", "dinov2_vits14"),
                                              ("vit_small_patch16_224.nosuchtag", "vit_small_patch16_224.dino")])
def test_unknown_name_is_rejected_with_suggestions(name: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(name)) as error:
        resolve_name(name)
    assert suggestion in str(error.value)


def test_non_vit_is_rejected() -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        load_backbone("resnet18", pretrained=False)


# --------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("height, width", [(32, 32), (32, 48)])
def test_patch_tokens_shape(height: int, width: int) -> None:
    backbone = tiny()
    x = image(height, width)
    grid = backbone.grid_size(height, width)
    assert grid == (height // 16, width // 16)
    assert backbone.forward_tokens(x).shape == (2, 1 + grid[0] * grid[1], 48)
    assert backbone(x).shape == (2, grid[0] * grid[1], 48)


def test_registers_are_removed() -> None:
    backbone = tiny("dinov2_vits14_reg")
    x = image(28, 42)
    tokens = backbone.forward_tokens(x)
    assert backbone.num_prefix_tokens == 5 and backbone.patch_size == 14
    assert tokens.shape == (2, 5 + 2 * 3, 48)
    torch.testing.assert_close(backbone(x), tokens[:, 5:])


def test_patch_tokens_are_row_major() -> None:
    backbone = tiny(depth=0)  # no attention: a patch token depends on its own pixels only
    x = image(32, 48, batch=1)
    changed = x.clone()
    changed[..., 16:32, 0:16] += 1.0  # patch at row 1, column 0 of the 2 x 3 grid
    moved = (backbone(changed) - backbone(x)).abs().amax(dim=-1)[0]  # (N,)
    assert moved.nonzero().flatten().tolist() == [1 * 3 + 0]


def test_size_not_multiple_of_patch_is_rejected() -> None:
    with pytest.raises(ConfigError, match="30x32"):
        tiny()(image(30, 32))


def test_random_init_is_frozen_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hummingbird_fungi.models.backbones"):
        backbone = load_backbone("vit_tiny_patch16_224", pretrained=False, **SMALL)
    assert backbone.weights_id == "random" and "RANDOM" in caplog.text
    assert not backbone.training and not backbone.model.training
    assert not any(param.requires_grad for param in backbone.parameters())
    assert (backbone.name, backbone.architecture, backbone.embed_dim) == ("vit_tiny_patch16_224",) * 2 + (48,)


# --------------------------------------------------------------------------- the local hub caches
# The real lookup (huggingface_hub's cache, torch.hub's checkpoints folder) on empty caches in tmp_path, with
# files planted where a download would have put them; nothing here touches the network or the user's caches.

DINO_REPO = "timm/vit_small_patch16_224.dino"  # timm's hf_hub_id of dino_vits16
DINO_URL_FILE = "dino_deitsmall16_pretrain.pth"  # the file name of its FAIR download URL


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Empty Hugging Face and torch.hub caches under tmp_path: (HF hub cache, torch.hub checkpoints folder)."""
    from huggingface_hub import constants

    hf, torch_home = tmp_path / "hf" / "hub", tmp_path / "torch"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(hf))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf))  # huggingface_hub reads the variables at import
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # no set_dir(): torch.hub.get_dir() is $TORCH_HOME/hub
    monkeypatch.setattr(bb, "_hub_reachable", lambda cfg: pytest.fail("the hub must not be contacted"))
    return hf, torch_home / "hub" / "checkpoints"


def plant_hf(cache: Path, repo: str, filename: str, data: bytes = b"weights", commit: str = "a" * 40) -> Path:
    """A file as huggingface_hub caches a download: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_hub_weights_cached_finds_the_files_a_download_leaves(caches) -> None:
    hf, checkpoints = caches
    assert not hub_weights_cached("dino_vits16")
    plant_hf(hf, "timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors")  # another model's weights
    assert not hub_weights_cached("dino_vits16") and hub_weights_cached("dinov2_vits14")
    cfg = timm.models.get_pretrained_cfg(resolve_name("dino_vits16"))
    for filename in ("pytorch_model.bin", "model.safetensors"):  # either file of the repo
        path = plant_hf(hf, DINO_REPO, filename)
        assert hub_weights_cached("dino_vits16") and bb._cached_hub_file(cfg) == str(path)
        path.unlink()
    assert not hub_weights_cached("dino_vits16")
    checkpoints.mkdir(parents=True)
    (checkpoints / DINO_URL_FILE).write_bytes(b"weights")  # a torch.hub download of the FAIR URL
    assert hub_weights_cached("vit_small_patch16_224.dino")
    assert bb._cached_hub_file(cfg) == str(checkpoints / DINO_URL_FILE)


def test_unreachable_hub_fails_fast_with_advice(caches, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bb, "_hub_reachable", lambda cfg: False)
    with pytest.raises(ConfigError, match="--weights FILE"):
        load_backbone("dino_vits16", **SMALL)


def test_cached_hub_weights_load_without_network(caches) -> None:
    original = tiny("dino_vits16")
    path = plant_hf(caches[0], DINO_REPO, "model.safetensors")
    save_file({key: value.contiguous() for key, value in original.model.state_dict().items()}, str(path))
    loaded = load_backbone("dino_vits16", **SMALL)
    assert loaded.weights_id == "hub:vit_small_patch16_224.dino"
    assert_same_tokens(loaded, original, 32, 32)


# --------------------------------------------------------------------------- weight files


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_layout_round_trip(tmp_path: Path, suffix: str) -> None:
    original = tiny("dinov2_vits14")
    path = tmp_path / f"weights{suffix}"
    state_dict = {key: value.contiguous() for key, value in original.model.state_dict().items()}
    if suffix == ".pth":
        torch.save(state_dict, path)
    else:
        save_file(state_dict, str(path))
    loaded = load_backbone("dinov2_vits14", weights=str(path), **SMALL)
    assert loaded.weights_id == f"file:{file_sha256(path)[:16]}"
    assert not any(param.requires_grad for param in loaded.parameters())
    assert_same_tokens(loaded, original, 28, 42)


@pytest.mark.parametrize("name, swiglu, chunk", [("dinov2_vits14_reg", False, 0), ("dinov2_vits14", False, 0),
                                                 ("dinov2_vitg14", True, 1)])
def test_fair_dinov2_layout(tmp_path: Path, name: str, swiglu: bool, chunk: int) -> None:
    original = tiny(name)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(to_fair_dinov2(original.model.state_dict(), swiglu, chunk), path)
    assert_same_tokens(load_backbone(name, weights=path, **SMALL), original, 28, 42)


@pytest.mark.parametrize("wrapped", [True, False])
def test_fair_dino_v1_layout(tmp_path: Path, wrapped: bool) -> None:
    original = tiny("dino_vits16")
    backbone = original.model.state_dict()
    head = {"head.mlp.0.weight": torch.randn(8, 48), "head.last_layer.weight_g": torch.randn(16, 1)}
    if wrapped:  # a DINO training checkpoint: DDP student (different weights) and teacher, both with heads
        checkpoint = {"student": {f"module.backbone.{key}": value + 1.0 for key, value in backbone.items()}
                      | {f"module.{key}": value for key, value in head.items()},
                      "teacher": {f"backbone.{key}": value for key, value in backbone.items()} | head,
                      "epoch": 100}
    else:  # a released backbone file that still carries its projection head
        checkpoint = backbone | head
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    assert_same_tokens(load_backbone("dino_vits16", weights=path, **SMALL), original, 32, 48)


def test_mismatched_state_dict_names_file_and_keys(tmp_path: Path) -> None:
    state_dict = tiny().model.state_dict()
    state_dict["bogus.weight"] = state_dict.pop("norm.weight")
    path = tmp_path / "broken.pth"
    torch.save(state_dict, path)
    with pytest.raises(DataError, match=re.escape(str(path))) as error:
        load_backbone("vit_tiny_patch16_224", weights=path, **SMALL)
    assert "norm.weight" in str(error.value) and "bogus.weight" in str(error.value)
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_backbone("vit_tiny_patch16_224", weights=path, **{**SMALL, "embed_dim": 64})


def test_corrupt_or_missing_file_names_path(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    for path in (corrupt, tmp_path / "missing.pth"):
        with pytest.raises(DataError, match=re.escape(str(path))):
            load_backbone("vit_tiny_patch16_224", weights=path, **SMALL)


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"hummingbird" * 100_000)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
