from .baton import BatonPDPolicy, BatonPolicy
from .orca import OrcaPolicy
from .static import StaticPolicy

POLICIES = {p.name: p for p in (StaticPolicy, OrcaPolicy, BatonPolicy, BatonPDPolicy)}

__all__ = ["POLICIES", "BatonPDPolicy", "BatonPolicy", "OrcaPolicy", "StaticPolicy"]
