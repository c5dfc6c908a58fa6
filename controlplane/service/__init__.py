"""`kcp serve`: the control-plane service (leader lease, reconciler)."""

from controlplane.service.app import ControlPlane
from controlplane.service.leader import LeaderLease
from controlplane.service.reconciler import Reconciler

__all__ = ["ControlPlane", "LeaderLease", "Reconciler"]
