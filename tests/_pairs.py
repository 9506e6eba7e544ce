"""Tiny registration pairs shared by the trainer tests: a disc (moving) and a shifted, larger disc (fixed)."""

import torch


def toy_pairs(n: int = 2, size: int = 16) -> list[dict]:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    items = []
    for i in range(n):
        m = (((y - 8.0) ** 2 + (x - 8.0) ** 2) < 16).float()[None]
        f = (((y - 8.0 - i) ** 2 + (x - 7.0) ** 2) < 20).float()[None]
        items.append({"moving": m * 0.8 + 0.1, "fixed": f * 0.8 + 0.1, "moving_label": m * 2, "fixed_label": f * 2})
    return items
