"""Scheduling: who renders next and where each job stands.

The fair-share policy (`fairshare`), users' lines and tenants' queues kept exact by
every transition (`lines`), the release order read from them (`order`), a queued
job's place and ETA (`positions`), and the fleet's live state in Redis: heartbeats,
render speeds, the dispatcher's wake-up and lock (`fleet`). Imports only the
platform modules of `shared`.
"""
