"""Prometheus metrics of the fleet, built at scrape time from the master's own state.

    jobs.py       JobTotals: per-(pool, function) job counts and duration histograms the
                  master keeps (dead children's final numbers folded in), merged with the
                  live children's shared-memory counts (gearvisor/shm/stats.py)
    health.py     HealthCounters: restarts by reason, quarantines (from the master's bus
                  events), and how a reaped child's exit is classified
    collector.py  FleetCollector: a prometheus-client custom collector (Counter-, Gauge-
                  and HistogramMetricFamily) over the pools, children, job totals, health
                  counters and the probe's cached gearmand views; registry() puts it on its
                  own CollectorRegistry with the master's ProcessCollector

Nothing here does I/O or imports the master: master/metrics.py (the component) feeds these
from the bus and serves the exposition over master/http.py.
"""
