"""The farm's processes: the CLI, the `up` launcher, the worker supervisor and the dispatcher loop.

Imports neither the HTTP views nor torch: the API and the workers are started as
processes of their own (`python -m api`, `python -m worker`).
"""
