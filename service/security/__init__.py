"""Who may call the server, and what never leaves it.

- ``settings``: the security flags (tokens, TLS, client specs) and the checks on the addresses served.
- ``auth``: token authentication and roles (an interceptor), and the server's TLS credentials.
- ``client_specs``: which fields a client's selector may add to a registry entry (safe loading).
- ``redaction``: scrubbing keys and tokens out of every text that leaves the server (statuses, logs).

Nothing is imported here: each module is imported by what needs it.
"""
