"""Webhooks on the Standard Webhooks specification: the transport, whatever the event.

The URL guard (`urls`), tenants' signing secrets and their rotation (`secrets`), the
outbox of deliveries with its claims, retries and log (`outbox`) and one HTTP attempt
(`delivery`). What a job's events say is `shared.jobs.deliveries`. Imports only the
platform modules of `shared`.
"""
