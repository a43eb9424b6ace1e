"""gearvisor: a supervisor for Gearman worker fleets."""

__version__ = "0.1.0"
