"""Composition roots, one per process: `primary` (the process the user started) and `worker`
(a DNS-only worker process); `dns_side` is the DNS side both build the same way. Every hook between
parts is passed here, where the parts are built.

May import every package except cli.
"""
