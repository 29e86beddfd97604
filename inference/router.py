"""Deprecated name of :mod:`inference.balancer` (the balancing policy), kept only while
``portal/daemons/router.py`` still imports ``from inference.router import Target``. Remove this file
once the portal imports ``from inference.balancer import Target``."""
from inference.balancer import Balancer, Target

__all__ = ["Balancer", "Target"]
