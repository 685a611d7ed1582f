"""Third-party norm classes whose forward was read and is known to be norm -> drop -> act.

A class is recognized by module and name, and trusted only while its forward's fingerprint
(:func:`groupnorm.convert._walk.forward_fingerprint`) is one that was read: another version of
the library is left alone, and the report says why. To support a new version, read its forward
and add the fingerprint here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from groupnorm.convert._walk import forward_fingerprint, qualname


@dataclass(frozen=True)
class Known:
    """How a known class computes: ``group_norm`` or ``batch_norm`` on x, then, when
    ``has_act``, ``self.drop`` then ``self.act``."""

    fingerprints: frozenset[str]
    has_act: bool
    version: str


# timm 1.0.31, read: BatchNormAct2d.forward is F.batch_norm (with torch's momentum
# bookkeeping), then self.drop, then self.act; SyncBatchNormAct.forward is SyncBatchNorm's, then
# drop and act where it has them. GroupNorm, GroupNorm1, GroupNormAct and GroupNorm1Act call
# F.group_norm (or timm's fast_group_norm when _fast_norm is set, which recognize() refuses),
# the *Act classes then self.drop and self.act.
_TIMM = "timm 1.0.31"
_N = "timm.layers.norm"
_NA = "timm.layers.norm_act"
KNOWN_BATCHNORMS: dict[str, Known] = {
    f"{_NA}.BatchNormAct2d": Known(frozenset({"aab01662c2e6c5ba"}), True, _TIMM),
    f"{_NA}.SyncBatchNormAct": Known(frozenset({"fdd24050a6823a4d"}), True, _TIMM),
}
KNOWN_GROUPNORMS: dict[str, Known] = {
    f"{_N}.GroupNorm": Known(frozenset({"7f5270765e35f6e7"}), False, _TIMM),
    f"{_N}.GroupNorm1": Known(frozenset({"1b467c7942c002fb"}), False, _TIMM),
    f"{_NA}.GroupNormAct": Known(frozenset({"6cbfa0e71705c914"}), True, _TIMM),
    f"{_NA}.GroupNorm1Act": Known(frozenset({"6cbfa0e71705c914"}), True, _TIMM),
}


def recognize(m: nn.Module, table: dict[str, Known]) -> Known | str | None:
    """The table entry for ``m``'s class; a reason when the class is listed but its forward is
    not the one read; None when it is not listed."""
    name = qualname(type(m))
    known = table.get(name)
    if known is None:
        return None
    if forward_fingerprint(type(m)) not in known.fingerprints:
        return f"{name}.forward is not the version that was read ({known.version}); left as it is"
    if getattr(m, "fast_norm", False) or getattr(m, "_fast_norm", False):
        return f"{type(m).__name__} uses timm's fast_norm (its own autocast rules); left as it is"
    return known
