"""GTPT variant configurations (frozen dataclasses), with the names users know: ``gtpt-s``, ``gtpt-b-wholebody``.

Numbers from ``shared/reference/gtpt-reference.md`` §1 (the official yaml files and model classes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class GTPTConfig:
    name: str
    dim: int                    # transformer width d
    stem: str                   # "one-stage" (ShuffleNetV2, T/S) or "u-shaped" (B)
    stem_channels: int          # stem output channels C
    num_keypoints: int          # 17 (COCO) or 133 (COCO-WholeBody)
    keep_rates: Tuple[float, float, float, float]  # per 3-layer block, relative to the 256 visual tokens
    heads: int = 8
    depth: int = 12             # 6 coarse + 6 fine
    mlp_ratio: int = 3
    image_size: Tuple[int, int] = (256, 192)  # (H, W)
    patch_size: Tuple[int, int] = (4, 3)      # (H, W) on the stride-4 stem map
    simcc_split_ratio: float = 2.0
    num_groups: int = 3
    num_sparse: int = 6         # sparse (body) tokens per fine group, padding token included

    def __post_init__(self):
        # Frozen: a list of rates becomes the tuple the field promises (hashable, immutable).
        object.__setattr__(self, "keep_rates", tuple(self.keep_rates))
        object.__setattr__(self, "image_size", tuple(self.image_size))
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        problems = []
        if self.num_keypoints not in (17, 133):
            problems.append(f"num_keypoints must be 17 (COCO) or 133 (COCO-WholeBody), got {self.num_keypoints}")
        if self.stem not in ("one-stage", "u-shaped"):
            problems.append(f"stem must be 'one-stage' or 'u-shaped', got {self.stem!r}")
        if self.heads <= 0 or self.dim <= 0 or self.dim % self.heads:
            problems.append(f"dim ({self.dim}) must be a positive multiple of heads ({self.heads})")
        if self.depth != 12:
            problems.append(f"depth must be 12 (GTPT's 6 coarse + 6 fine layers and its pruning sites), got "
                            f"{self.depth}")
        rates = self.keep_rates
        if len(rates) != 4 or not all(isinstance(r, (int, float)) and 0.0 < r <= 1.0 for r in rates):
            problems.append(f"keep_rates must be 4 rates in (0, 1], one per 3-layer block, got {rates!r}")
        elif any(b > a for a, b in zip(rates, rates[1:])):
            problems.append(f"keep_rates must not increase from block to block (pruned tokens do not come "
                            f"back), got {rates!r}")
        if len(self.image_size) != 2 or len(self.patch_size) != 2 or any(
                h <= 0 or p <= 0 or h % (4 * p) for h, p in zip(self.image_size, self.patch_size)):
            problems.append(f"image_size {self.image_size} must be a multiple of 4 x patch_size {self.patch_size}")
        if problems:
            raise ValueError(f"invalid GTPT config {self.name!r}: " + "; ".join(problems))

    @property
    def wholebody(self) -> bool:
        return self.num_keypoints == 133

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def mlp_dim(self) -> int:
        return self.dim * self.mlp_ratio

    @property
    def grid(self) -> Tuple[int, int]:
        """Patch grid (rows, cols): 16 x 16."""
        return (self.image_size[0] // (4 * self.patch_size[0]), self.image_size[1] // (4 * self.patch_size[1]))

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_dim(self) -> int:
        return self.stem_channels * self.patch_size[0] * self.patch_size[1]

    @property
    def simcc_bins(self) -> Tuple[int, int]:
        """(x bins, y bins) = (W * ratio, H * ratio) = (384, 512)."""
        return (int(self.image_size[1] * self.simcc_split_ratio), int(self.image_size[0] * self.simcc_split_ratio))

    @property
    def num_part_tokens(self) -> int:
        return 5 if self.wholebody else 0

    @property
    def num_dense(self) -> int:
        return self.num_keypoints - 17

    def layer_keep_rates(self) -> Tuple[float, ...]:
        """The 12 per-layer keep rates of the pruned (student / eval) path: each entry repeated 3 times."""
        return tuple(r for r in self.keep_rates for _ in range(self.depth // 4))


_BODY_KEEP = (1.0, 0.7, 0.3, 0.1)
_WB_KEEP = (1.0, 0.7, 0.5, 0.3)

VARIANTS = {
    "gtpt-t": GTPTConfig("gtpt-t", 128, "one-stage", 128, 17, _BODY_KEEP),
    "gtpt-s": GTPTConfig("gtpt-s", 192, "one-stage", 256, 17, _BODY_KEEP),
    "gtpt-b": GTPTConfig("gtpt-b", 192, "u-shaped", 256, 17, _BODY_KEEP),
    "gtpt-t-wholebody": GTPTConfig("gtpt-t-wholebody", 128, "one-stage", 128, 133, _WB_KEEP),
    "gtpt-s-wholebody": GTPTConfig("gtpt-s-wholebody", 192, "one-stage", 256, 133, _WB_KEEP),
    "gtpt-b-wholebody": GTPTConfig("gtpt-b-wholebody", 192, "u-shaped", 256, 133, _WB_KEEP),
}


def get_config(name: str) -> GTPTConfig:
    """The config of a variant by name (case-insensitive; ``_`` and ``-`` interchangeable)."""
    if isinstance(name, GTPTConfig):
        return name
    key = str(name).strip().lower().replace("_", "-")
    if key not in VARIANTS:
        raise ValueError(f"unknown GTPT variant {name!r}; valid names: {', '.join(VARIANTS)}")
    return VARIANTS[key]


def list_variants() -> Tuple[str, ...]:
    return tuple(VARIANTS)
