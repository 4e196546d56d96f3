"""A band that moves between steps to keep the kept fraction near a target."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BandController:
    """Widens the pass-rate band when too few groups are kept, narrows it when too many are.

    Each `update(kept_fraction)` moves both edges by `step` (outward when the kept fraction is
    under `target_kept - tolerance`, inward when over `target_kept + tolerance`), within
    `bounds`, never narrower than `min_width`. The band then follows the policy as it improves:
    when more prompts become easy and fall above the band, the kept fraction drops and the band
    widens until they count again.

    Attributes:
        band: the current (lo, hi); pass it to group_advantages(band=controller.band).
    """

    band: tuple[float, float] = (0.1, 0.9)
    target_kept: float = 0.5
    tolerance: float = 0.05
    step: float = 0.02
    min_width: float = 0.1
    bounds: tuple[float, float] = (0.0, 1.0)
    history: list[tuple[float, float]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        lo, hi = self.band
        blo, bhi = self.bounds
        if not 0.0 <= blo <= lo <= hi <= bhi <= 1.0:
            raise ValueError(
                f"need 0 <= bounds[0] <= band[0] <= band[1] <= bounds[1] <= 1, got band={self.band}, bounds={self.bounds}"
            )
        if not 0.0 <= self.target_kept <= 1.0 or self.tolerance < 0 or self.step <= 0:
            raise ValueError("target_kept must be in [0, 1], tolerance >= 0 and step > 0")
        if not 0.0 <= self.min_width <= bhi - blo:
            raise ValueError(f"min_width must be in [0, {bhi - blo}], got {self.min_width}")
        self.band = (float(lo), float(hi))

    def update(self, kept_fraction: float) -> tuple[float, float]:
        """One step of control from the last batch's kept fraction (a float, e.g. from
        GroupAdvantages.metrics()["kept_fraction"]); returns the new band."""
        lo, hi = self.band
        blo, bhi = self.bounds
        if kept_fraction < self.target_kept - self.tolerance:
            lo, hi = max(blo, lo - self.step), min(bhi, hi + self.step)
        elif kept_fraction > self.target_kept + self.tolerance:
            center = (lo + hi) / 2
            half = max(self.min_width / 2, (hi - lo) / 2 - self.step)
            lo, hi = max(blo, center - half), min(bhi, center + half)
        self.band = (lo, hi)
        self.history.append(self.band)
        return self.band

    def metrics(self) -> dict[str, float]:
        lo, hi = self.band
        return {"band_lo": lo, "band_hi": hi, "band_width": hi - lo}
