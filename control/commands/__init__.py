"""The CLI's commands by who runs them: the farm's processes, its operators, and its clients.

`processes` starts the farm or one of its pieces, `operators` changes accounts in
the database directly, and `client` talks to a running farm over HTTP with an API key.
`control.cli` assembles them into `kolors-farm`.
"""
