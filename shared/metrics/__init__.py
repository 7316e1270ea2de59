"""The farm's metrics: events counted in Redis by every process, and scrape-time readings.

`counters` holds the metric families, the events processes record after their SQL
commits and the counters read back; `readings` what a scrape reads live (queues per
tenant, workers' gauges). `api/metrics.py` turns both into the Prometheus format.
Imports the platform modules and `shared.scheduling`.
"""
