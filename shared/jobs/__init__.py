"""Jobs: a request from submission to its images.

The request schema (`params`); every change of a job's state, with the line, ledger
and outbox entries that go with it (`transitions`, the one owner); reads of jobs
(`queries`); the status and result bodies the API and the webhooks answer
(`bodies`, `deliveries`); the result cache (`cache`), idempotency keys
(`idempotency`), image encoding (`imaging`), a job's hot state in Redis:
completion notices, progress, the event stream, cancel flags (`events`), and the
audit of the books (`audit`). The top of `shared`: imports every other package.
"""
