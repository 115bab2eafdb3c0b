"""End to end: a real dnsgate, real DNS clients, over loopback."""
