"""`kcp serve`: the control-plane service (leader lease, reconciler)."""

from .app import ControlPlane
from .leader import LeaderLease
from .reconciler import Reconciler

__all__ = ["ControlPlane", "LeaderLease", "Reconciler"]
