"""Encoders: frozen models that map images to a grid of patch tokens.

`create_encoder` wraps any supported model (a timm ViT, a torch.hub DINO/DINOv2 module, a
torchvision ViT, a CNN feature map at a known stride, or a plain feature function) in the
`Encoder` interface the rest of the toolkit uses; `load_backbone` builds the named timm
backbones (DINO, DINOv2) with hub or local weights.
"""
