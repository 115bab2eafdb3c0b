"""The HTTP server's parts: the consent API, its guard and listener, the portal, the observe API and
the OpenAPI description of them all.

May import everything below it (base, rules, consent, dns, observe); never workers, app or cli.
"""
