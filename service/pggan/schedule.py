"""The progressive-growing timeline as a pure function of images seen (no torch, no ray).

Stages alternate: the start resolution trains stable, then every higher resolution first fades in
(alpha 0 -> 1, linear in images shown) and then trains stable. Lengths come from the config in kimg.

Stages are quantized to whole training steps: a stage holds ceil(images / minibatch) steps of its own
global minibatch, starting exactly where the previous one ended. So every boundary is an image count
the training loop actually reaches, the count after the last step equals :func:`total_nimg` exactly,
and resume needs nothing but the image count. Where kimg * 1000 is a multiple of the minibatch (all
paper stages up to 128x128) the boundaries are the nominal ones.

If ``schedule.total_kimg`` is past the natural end (the final stable stage's nominal end), the final
stable stage goes on until it; if it is before, the schedule is cut there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .config import RunConfig

Kind = Literal["stable", "fade"]


@dataclass(frozen=True)
class Stage:
    """One stage of the timeline. ``start``/``end`` are image counts: start <= nimg < end."""

    index: int
    resolution: int
    kind: Kind
    start: int
    end: int
    minibatch: int  # global, over all workers
    lr: float

    @property
    def name(self) -> str:
        return f"{self.index:02d}-{self.resolution}-{self.kind}"

    @property
    def nimg(self) -> int:
        return self.end - self.start

    @property
    def steps(self) -> int:
        return self.nimg // self.minibatch

    def alpha(self, nimg: int) -> float:
        """Fade-in blend factor at an image count within (or around) this stage; 1.0 for stable stages."""
        if self.kind == "stable":
            return 1.0
        return min(max((nimg - self.start) / self.nimg, 0.0), 1.0)

    def to_dict(self) -> dict:
        return asdict(self) | {"name": self.name}


def _steps_nimg(nimg: int, minibatch: int) -> int:
    return -(-nimg // minibatch) * minibatch  # ceil to whole steps


def stages(cfg: "RunConfig") -> list[Stage]:
    """All stages of the run in order, quantized to whole steps and cut or extended at total_kimg."""
    sched = cfg.schedule
    nominal: list[tuple[int, Kind, int]] = []  # (resolution, kind, nominal images)
    for i, res in enumerate(cfg.resolutions()):
        if i > 0:
            nominal.append((res, "fade", sched.fade_nimg(res)))
        nominal.append((res, "stable", sched.stable_nimg(res)))
    natural_end = sum(n for _, _, n in nominal)
    total = natural_end if sched.total_kimg is None else round(sched.total_kimg * 1000)

    out: list[Stage] = []
    start = nominal_start = 0
    for i, (res, kind, n) in enumerate(nominal):
        if start >= total:
            break
        last = i == len(nominal) - 1
        nominal_end = nominal_start + n
        target = max(nominal_end, total) if last else min(nominal_end, total)
        mb = sched.minibatch(res)
        end = start + _steps_nimg(max(target - start, 1), mb)
        out.append(Stage(index=len(out), resolution=res, kind=kind, start=start, end=end, minibatch=mb,
                         lr=sched.lr(res)))
        start, nominal_start = end, nominal_end
    return out


def total_nimg(cfg: "RunConfig") -> int:
    """Images shown to D when the run is complete: the end of the last stage."""
    return stages(cfg)[-1].end


def current_stage(nimg: int, all_stages: list[Stage]) -> Stage:
    """The stage a run that has seen ``nimg`` images is in: the first one ending after nimg (the last one past
    the end of the run). Its fade-in alpha there is ``stage.alpha(nimg)``. Negative counts are an error."""
    if nimg < 0:
        raise ValueError(f"nimg must be >= 0, got {nimg}")
    return next((st for st in all_stages if nimg < st.end), all_stages[-1])


def lr_at(nimg: int, stage: Stage, rampup_kimg: float) -> float:
    """Learning rate at nimg within a stage, with the optional linear ramp-up from the stage start."""
    if rampup_kimg <= 0:
        return stage.lr
    return stage.lr * min((nimg - stage.start) / (rampup_kimg * 1000), 1.0)
