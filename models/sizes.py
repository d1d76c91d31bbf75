"""Which image sizes a model generates: its default, the multiple every side must be, and the limits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    width: int  # the default (the model's native size)
    height: int
    multiple: int = 1  # every side a multiple of this (Flux: VAE factor 8 × 2×2 packing = 16)
    min_side: int | None = None  # None: the default side is the only one
    max_side: int | None = None
    max_pixels: int | None = None

    @classmethod
    def fixed(cls, width: int, height: int) -> Sizes:
        return cls(width, height, 1, None, None)

    @property
    def native(self) -> str:
        return f"{self.width}x{self.height}"

    def error(self, width: int, height: int) -> tuple[str, str] | None:
        """None if (width, height) can be generated; else (the field at fault, a message naming the rule)."""
        if self.min_side is None:
            if (width, height) != (self.width, self.height):
                bad = "width" if width != self.width else "height"
                return bad, f"{bad} must be {getattr(self, bad)}: this model generates {self.native} images only"
            return None
        for name, side in (("width", width), ("height", height)):
            if side % self.multiple:
                return name, f"{name} must be a multiple of {self.multiple}, not {side}"
            if not self.min_side <= side <= (self.max_side or side):
                return name, f"{name} must be between {self.min_side} and {self.max_side}, not {side}"
        if self.max_pixels is not None and width * height > self.max_pixels:
            return "width", f"width × height must be at most {self.max_pixels} pixels, not {width * height}"
        return None

    def describe(self) -> dict:
        return {"default": self.native, "multiple": self.multiple, "min_side": self.min_side,
                "max_side": self.max_side, "max_pixels": self.max_pixels}  # fmt: skip
