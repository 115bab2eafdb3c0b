"""The DNS side: a packet's path from socket to answer, in the order a packet meets it.

`listeners` (UDP/TCP sockets) -> `admission` (ACL, rate limits) -> `identity` (who is asking) ->
`pipeline` (the per-query decision: `local_answers`, `portal_address`, `sinkhole`, `cache`,
`cloaking`) -> `forwarding` (a miss goes upstream) -> `upstreams` (which server, which transport) ->
`cname_chains` (finishing what an upstream left short). `message` is dnslib for rare packets;
`tally` and `counts` are the plain counters the hot path increments.

May import: the shared base (dnsgate/*.py), dnsgate.rules' catalog and lists, dnsgate.consent.
Never imports observe, http, workers, app or cli: those are built on top of it.
"""

from dnsgate.lazy_imports import defer

# HTTP/2 (h2, with hpack and hyperframe: ~1.2 MiB in a process) is loaded when the first DoH client
# negotiates it or an https:// upstream is configured, not when a DoH listener starts: a network
# whose clients use DoH over HTTP/1.1, or no DoH yet, never holds it.
for _module in ("h2.config", "h2.connection", "h2.errors", "h2.events", "h2.exceptions", "h2.settings"):
    defer(_module)
